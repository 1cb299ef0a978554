"""Second derivatives (backward with create_graph=True) of every differentiable op.

Every backend against float64 autograd of the textbook formulas, fed the same noise (the
reference's streams for the drawn seed) and the same VQ indices; ``gradgradcheck`` in
float64 where a backend takes float64 (``torch``, and ``auto``, which routes float64 there).
"""
import math

import pytest
import torch

import fastvae
from fastvae import reference
from fastvae.ops._common import draw_seed

from helpers import DTYPES, assert_close, randn, requires

SEED = 2024
NEG_INF = float("-inf")


def _generator():
    return torch.Generator().manual_seed(SEED)


def _seed():
    """The seed tensor a call with ``generator=_generator()`` draws."""
    return draw_seed(torch.device("cpu"), _generator())


def _reduce(value, reduction, batch):
    return {"none": value, "sum": value.sum(), "mean": value.mean(), "batchmean": value.sum() / batch}[reduction]


def _kl_textbook(mu, logvar, prior_mu=0.0, prior_logvar=0.0):
    prior_logvar = torch.as_tensor(prior_logvar, dtype=mu.dtype)
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu) ** 2) / prior_logvar.exp() - 1.0)


def _gumbel_textbook(logits, tau, hard, dim):
    moved = logits.movedim(dim, -1)
    noise = reference.gumbel_stream(_seed(), moved[..., 0].numel(), moved.shape[-1], logits.device, logits.dtype)
    soft = torch.softmax((moved + noise.reshape(moved.shape)) / tau, dim=-1)
    if hard:
        one_hot = torch.nn.functional.one_hot(soft.argmax(-1), moved.shape[-1]).to(soft.dtype)
        soft = one_hot - soft.detach() + soft  # straight-through
    return soft.movedim(-1, dim)


def _categorical_kl_textbook(logits, prior_logits, reduction):
    p = torch.softmax(logits, -1)
    log_q = -math.log(logits.shape[-1]) if prior_logits is None else torch.log_softmax(prior_logits, -1)
    # masked classes (p = 0) contribute 0; where() keeps their -inf log p out of the gradient
    log_ratio = torch.where(p > 0, torch.log_softmax(logits, -1) - log_q, 0.0)
    return _reduce((p * log_ratio).sum(-1), reduction, logits.shape[0])


def _vq_textbook(x, codebook, indices, beta):
    code = codebook[indices]
    mse = torch.nn.functional.mse_loss
    return x + (code - x).detach(), mse(code, x.detach()) + beta * mse(x, code.detach())


# name -> (ops used, shapes of the inputs, fastvae function, textbook function). The
# functions take the inputs and return the differentiable outputs; a -inf mask enters as
# a constant added to the logits.
MASK = torch.tensor([0.0, NEG_INF, 0.0, 0.0, NEG_INF])
CASES = {
    "reparameterize": (("reparameterize",), [(3, 4), (3, 4)],
                       lambda mu, lv: fastvae.reparameterize(mu, lv, generator=_generator()),
                       lambda mu, lv: mu + (0.5 * lv).exp() * reference.normal_stream(_seed(), mu.shape, "cpu",
                                                                                       mu.dtype)),
    **{f"gaussian_kl_{r}": (("gaussian_kl",), [(3, 4), (3, 4)],
                            lambda mu, lv, r=r: fastvae.gaussian_kl(mu, lv, reduction=r),
                            lambda mu, lv, r=r: _reduce(_kl_textbook(mu, lv), r, mu.shape[0]))
       for r in ("none", "sum", "batchmean")},
    "gaussian_kl_prior": (("gaussian_kl",), [(3, 4), (3, 4), (4,), (3, 1)],
                          lambda mu, lv, pm, plv: fastvae.gaussian_kl(mu, lv, pm, plv, reduction="mean"),
                          lambda mu, lv, pm, plv: _kl_textbook(mu, lv, pm, plv).mean()),
    "reparameterize_kl": (("reparameterize_kl",), [(3, 4), (3, 4)],
                          lambda mu, lv: fastvae.reparameterize_kl(mu, lv, reduction="sum", generator=_generator()),
                          lambda mu, lv: (mu + (0.5 * lv).exp() * reference.normal_stream(_seed(), mu.shape, "cpu",
                                                                                          mu.dtype),
                                          _kl_textbook(mu, lv).sum())),
    **{f"gumbel_softmax_{kind}": (("gumbel_softmax", "gumbel_softmax_backward", "gumbel_softmax_backward_from_sample"),
                                  [(2, 5, 3)],
                                  lambda x, h=hard: fastvae.gumbel_softmax(x, 0.7, h, dim=1, generator=_generator()),
                                  lambda x, h=hard: _gumbel_textbook(x, 0.7, h, 1))
       for kind, hard in (("soft", False), ("hard", True))},
    "gumbel_softmax_masked": (("gumbel_softmax", "gumbel_softmax_backward_from_sample"), [(4, 5)],
                              lambda x: fastvae.gumbel_softmax(x + MASK.to(x.dtype), 0.5, generator=_generator()),
                              lambda x: _gumbel_textbook(x + MASK.to(x.dtype), 0.5, False, -1)),
    "categorical_kl": (("categorical_kl",), [(4, 5)],
                       lambda x: fastvae.categorical_kl(x, reduction="none"),
                       lambda x: _categorical_kl_textbook(x, None, "none")),
    "categorical_kl_prior_masked": (("categorical_kl",), [(4, 5), (5,)],
                                    lambda x, p: fastvae.categorical_kl(x + MASK.to(x.dtype), p, reduction="batchmean"),
                                    lambda x, p: _categorical_kl_textbook(x + MASK.to(x.dtype), p, "batchmean")),
    "vector_quantize": (("vector_quantize",), [(6, 3), (5, 3)],
                        lambda x, cb: fastvae.vector_quantize(x, cb, beta=0.3)[0::2],
                        None),  # the textbook needs the indices: see _outputs
}


def _outputs(name, inputs, textbook):
    ops, _, ours, theirs = CASES[name]
    if name == "vector_quantize" and textbook:
        # the indices the op picks for the float32 inputs the float64 ones were made from
        indices = fastvae.vector_quantize(*[t.detach().float() for t in inputs])[1]
        return _vq_textbook(*inputs, indices, 0.3)
    out = (theirs if textbook else ours)(*inputs)
    return out if isinstance(out, tuple) else (out,)


def _second_order(outputs, inputs, weights, directions):
    """First gradients of sum(weights * outputs) (kept differentiable), then the gradients
    of sum(directions * first gradients) with respect to the inputs and the weights."""
    loss = sum((w * o).sum() for w, o in zip(weights, outputs))
    first = torch.autograd.grad(loss, inputs, create_graph=True)
    second = torch.autograd.grad(sum((d * g).sum() for d, g in zip(directions, first)), inputs + weights,
                                 allow_unused=True, materialize_grads=True)
    return first, second


def _requiring_grad(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("name", sorted(CASES))
def test_second_derivatives_match_float64_autograd(backend, name):
    """float32 on every backend (the kernels' backward path) against float64 autograd."""
    ops, shapes, _, _ = CASES[name]
    requires(backend, *ops)
    inputs = [randn(*shape) for shape in shapes]
    with torch.no_grad():
        output_shapes = [o.shape for o in _outputs(name, inputs, textbook=False)]
    weights = [randn(*shape) for shape in output_shapes]
    directions = [randn(*shape) for shape in shapes]
    results = []
    for dtype, textbook in ((torch.float32, False), (torch.float64, True)):
        leaves, w = _requiring_grad(inputs, dtype), _requiring_grad(weights, dtype)
        results.append(_second_order(_outputs(name, leaves, textbook), leaves, w, [d.to(dtype) for d in directions]))
    (first, second), (first64, second64) = results
    for got, expected in zip(first + second, first64 + second64):
        assert_close(got, expected, torch.float32, scale=5)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("choice", ["torch", "auto"])
def test_gradgradcheck_float64(name, choice):
    inputs = _requiring_grad([randn(*shape) for shape in CASES[name][1]], torch.float64)
    with fastvae.use_backend(choice):
        if name != "vector_quantize":
            assert torch.autograd.gradgradcheck(lambda *xs: _outputs(name, xs, textbook=False), inputs)
            return
        # Finite differences cannot see a stop-gradient (x's gradient is constant in the
        # codebook only by sg): check each input with the other held constant.
        x, codebook = inputs
        assert torch.autograd.gradgradcheck(lambda x: _outputs(name, (x, codebook.detach()), False), (x,))
        assert torch.autograd.gradgradcheck(lambda codebook: _outputs(name, (x.detach(), codebook), False),
                                            (codebook,))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_kl_plus_cube_has_second_derivative_one_plus_six_mu(backend, dtype):
    """The issue's example: d2/dmu2 of gaussian_kl(sum) + sum(mu^3) is 1 + 6 mu."""
    if dtype == torch.float64 and backend != "torch":
        pytest.skip(f"backend {backend!r} does not take float64")
    mu, logvar = randn(3, 4, dtype=dtype, requires_grad=True), randn(3, 4, dtype=dtype, requires_grad=True)
    grad_mu, = torch.autograd.grad(fastvae.gaussian_kl(mu, logvar, reduction="sum") + (mu**3).sum(), mu,
                                   create_graph=True)
    second, = torch.autograd.grad(grad_mu.sum(), mu)
    assert_close(second, 1 + 6 * mu.detach().double(), dtype)
