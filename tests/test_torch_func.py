"""torch.func over the ops on every backend: grad, jacrev (and Hessians as jacrev of
jacrev) against eager autograd, vmap against one call per sample, vmap's randomness
modes for the random ops, and forward-mode AD as an error."""
import pytest
import torch
from torch.autograd import forward_ad
from torch.func import grad, hessian, jacrev, jvp, vmap

import fastvae
from fastvae.ops._common import draw_seed

from helpers import assert_close, randn, requires


def _generator():
    return torch.Generator().manual_seed(31)


# name -> (ops used, input shapes, scalar function of the inputs)
SCALAR_FUNCTIONS = {
    "reparameterize": (("reparameterize",), [(3, 4), (3, 4)],
                       lambda mu, lv: fastvae.reparameterize(mu, lv, generator=_generator()).square().sum()),
    "gaussian_kl": (("gaussian_kl",), [(3, 4), (3, 4), (4,)],
                    lambda mu, lv, prior_mu: fastvae.gaussian_kl(mu, lv, prior_mu, reduction="batchmean")),
    "reparameterize_kl": (("reparameterize_kl",), [(3, 4), (3, 4)],
                          lambda mu, lv: sum(o.square().sum() for o in fastvae.reparameterize_kl(
                              mu, lv, generator=_generator()))),
    "gumbel_softmax": (("gumbel_softmax", "gumbel_softmax_backward_from_sample"), [(3, 5)],
                       lambda x: (fastvae.gumbel_softmax(x, 0.7, generator=_generator()) * x).sum()),
    "gumbel_softmax_hard": (("gumbel_softmax", "gumbel_softmax_backward"), [(3, 5)],
                            lambda x: (fastvae.gumbel_softmax(x, 0.7, True, generator=_generator()) * x).sum()),
    "categorical_kl": (("categorical_kl",), [(3, 5), (5,)],
                       lambda x, prior: fastvae.categorical_kl(x, prior, reduction="sum")),
    "vector_quantize": (("vector_quantize",), [(6, 3), (4, 3)],
                        lambda x, cb: (lambda q, _, loss: q.square().sum() + loss)(*fastvae.vector_quantize(x, cb))),
}


def _inputs(shapes):
    return [randn(*shape) for shape in shapes]


@pytest.mark.parametrize("name", sorted(SCALAR_FUNCTIONS))
def test_grad_and_hessian_match_eager_autograd(backend, name):
    ops, shapes, fn = SCALAR_FUNCTIONS[name]
    requires(backend, *ops)
    inputs = _inputs(shapes)
    argnums = tuple(range(len(inputs)))
    leaves = [t.clone().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(fn(*leaves), leaves)
    for got, want in zip(grad(fn, argnums)(*inputs), expected):
        assert_close(got, want, torch.float32)
    # Hessian in the first input: reverse over reverse against eager double backward
    expected_hessian = torch.autograd.functional.hessian(lambda first: fn(first, *inputs[1:]), inputs[0])
    assert_close(jacrev(jacrev(fn))(*inputs), expected_hessian, torch.float32)


# name -> (ops used, input shapes, tensor-valued deterministic function of the inputs)
DETERMINISTIC_FUNCTIONS = {
    "gaussian_kl_none": (("gaussian_kl",), [(3, 4), (3, 4)],
                         lambda mu, lv: fastvae.gaussian_kl(mu, lv, reduction="none")),
    "gaussian_kl_mean": (("gaussian_kl",), [(3, 4), (3, 4)],
                         lambda mu, lv: fastvae.gaussian_kl(mu, lv, reduction="mean")),
    "categorical_kl": (("categorical_kl",), [(3, 5), (5,)],
                       lambda x, prior: fastvae.categorical_kl(x, prior, reduction="none")),
    "nearest_code": (("nearest_code",), [(6, 3), (4, 3)], lambda x, cb: fastvae.nearest_code(x, cb)),
    "vector_quantize": (("vector_quantize",), [(6, 3), (4, 3)], lambda x, cb: fastvae.vector_quantize(x, cb)),
}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC_FUNCTIONS))
def test_vmap_and_jacrev_match_per_sample_calls(backend, name):
    ops, shapes, fn = DETERMINISTIC_FUNCTIONS[name]
    requires(backend, *ops)
    batch = 2
    inputs = _inputs(shapes)
    batched = [randn(batch, *shapes[0])] + inputs[1:]  # the first input batched, the rest shared
    outputs = vmap(fn, (0,) + (None,) * (len(inputs) - 1))(*batched)
    for b in range(batch):
        for got, want in zip(outputs if isinstance(outputs, tuple) else (outputs,),
                             (lambda o: o if isinstance(o, tuple) else (o,))(fn(batched[0][b], *inputs[1:]))):
            assert got[b].dtype == want.dtype
            assert_close(got[b], want, torch.float32)
    if name != "nearest_code":  # nearest_code is not differentiable
        first_output = (lambda *xs: (lambda o: o[0] if isinstance(o, tuple) else o)(fn(*xs)))
        expected = torch.autograd.functional.jacobian(first_output, tuple(inputs))
        for got, want in zip(jacrev(first_output, tuple(range(len(inputs))))(*inputs), expected):
            assert_close(got, want, torch.float32)


def test_per_sample_gradients(backend):
    """vmap(grad(f)): one gradient per sample, as a loop of calls gives."""
    requires(backend, "gaussian_kl", "vector_quantize")
    mu, logvar, codebook = randn(3, 2, 4), randn(3, 2, 4), randn(5, 4)

    def loss(mu, logvar, codebook):
        return fastvae.gaussian_kl(mu, logvar, reduction="sum") + fastvae.vector_quantize(mu, codebook)[2]

    per_sample = vmap(grad(loss, (0, 1, 2)), (0, 0, None))(mu, logvar, codebook)
    for b in range(3):
        for got, want in zip(per_sample, grad(loss, (0, 1, 2))(mu[b], logvar[b], codebook)):
            assert_close(got[b], want, torch.float32)


RANDOM_FUNCTIONS = {
    "reparameterize": (("reparameterize",),
                       lambda x, generator=None: fastvae.reparameterize(x, x, generator=generator)),
    "gumbel_softmax": (("gumbel_softmax",), lambda x, generator=None: fastvae.gumbel_softmax(x, generator=generator)),
}


@pytest.mark.parametrize("name", sorted(RANDOM_FUNCTIONS))
def test_vmap_randomness_modes(backend, name):
    """The seed is drawn as torch.randint is under vmap: once ("same": every sample gets
    the noise of a single call), per sample ("different"), or an error ("error")."""
    ops, fn = RANDOM_FUNCTIONS[name]
    requires(backend, *ops)
    batch = randn(1, 3, 5).expand(3, 3, 5)  # identical samples
    same = vmap(lambda x: fn(x, _generator()), randomness="same")(batch)
    single = fn(batch[0], _generator())
    for b in range(3):
        assert torch.equal(same[b], single)
    different = vmap(fn, randomness="different")(batch)
    assert not torch.equal(different[0], different[1]) and not torch.equal(different[1], different[2])
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(fn)(batch)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_per_sample_gradients_with_per_sample_noise(backend, hard, monkeypatch):
    """vmap(grad(f), randomness="different"), as DP-SGD on a VAE needs: each sample's
    gradient is the one of a call on that sample with the seeds vmap drew for it."""
    requires(backend, "reparameterize", "gumbel_softmax")
    mu, logvar, logits = randn(3, 4), randn(3, 4), randn(3, 5)

    def loss(mu, logvar, logits):
        y = fastvae.gumbel_softmax(logits, 0.5, hard)
        return fastvae.reparameterize(mu, logvar).square().sum() + (y * logits).sum()

    def seed_draws():  # the seeds the two ops draw for each sample
        return vmap(lambda _: tuple(draw_seed(mu.device, None) for _ in range(2)), randomness="different")(mu)

    torch.manual_seed(7)
    per_sample = vmap(grad(loss, (0, 1, 2)), randomness="different")(mu, logvar, logits)
    torch.manual_seed(7)
    gumbel_seeds, normal_seeds = seed_draws()
    for b in range(3):
        seeds = iter([gumbel_seeds[b], normal_seeds[b]])
        monkeypatch.setattr(fastvae.ops.gumbel, "draw_seed", lambda device, generator: next(seeds))
        monkeypatch.setattr(fastvae.ops.gaussian, "draw_seed", lambda device, generator: next(seeds))
        for got, want in zip(per_sample, grad(loss, (0, 1, 2))(mu[b], logvar[b], logits[b])):
            assert_close(got[b], want, torch.float32)


def test_forward_mode_is_an_error_not_a_silent_zero(backend):
    """Forward-mode AD is not implemented: every entry to it raises (the bare kernels
    used to give a zero or missing tangent)."""
    requires(backend, "gaussian_kl")
    mu, logvar = randn(3, 4), randn(3, 4)
    message = "implement the jvp function"
    with pytest.raises(NotImplementedError, match=message):
        jvp(lambda m: fastvae.gaussian_kl(m, logvar), (mu,), (torch.ones_like(mu),))
    with pytest.raises(NotImplementedError, match=message):
        hessian(lambda m: fastvae.gaussian_kl(m, logvar))(mu)
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=message):
        fastvae.gaussian_kl(forward_ad.make_dual(mu, torch.ones_like(mu)), logvar)
