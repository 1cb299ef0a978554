"""Gaussian column: reparameterize, gaussian_kl, reparameterize_kl on every backend.

Outputs are checked against fastvae.reference evaluated in float64 (the spec, including
the noise stream), KL values against torch.distributions, gradients against float64
autograd of the textbook formulas, and the samplers against the law N(0, 1).
"""
import pytest
import torch
from scipy import stats
from torch.distributions import Normal, kl_divergence

import fastvae
from fastvae import reference
import helpers
from helpers import DTYPES, as64, non_contiguous, randn, requires, requires_on

REDUCTIONS = ["none", "sum", "mean", "batchmean"]
# Not multiples of any block, one element, 0-d, empty, 3-D, one row longer than a block.
SHAPES = [(7, 13), (1,), (), (0, 4), (3, 0), (3, 5, 9), (2, 1030)]
SEED = 20240917
FORWARD_OPS = ("reparameterize", "gaussian_kl", "reparameterize_kl")
BACKWARD_OPS = tuple(op + "_backward" for op in FORWARD_OPS)


def assert_close(actual, expected, dtype, scale=1.0):
    """helpers.assert_close where a NaN expected (the 0 / 0 batchmean of an empty batch) is matched."""
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    helpers.assert_close(actual[~nan], expected[~nan], dtype, scale)


def seed_tensor(seed=SEED, device="cpu"):
    return torch.tensor([seed], dtype=torch.int64, device=device)


def inputs(shape, dtype, device="cpu", requires_grad=False):
    mu = randn(*shape, dtype=dtype, device=device, requires_grad=requires_grad)
    logvar = randn(*shape, dtype=dtype, device=device, scale=0.7, requires_grad=requires_grad)
    return mu, logvar


def textbook_kl(mu, logvar, prior_mu=None, prior_logvar=None):
    """Elementwise KL of diagonal Gaussians, float64 autograd-able (priors broadcast)."""
    prior_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu
    prior_logvar = torch.zeros_like(mu) if prior_logvar is None else prior_logvar
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu) ** 2) / prior_logvar.exp() - 1.0)


def reduce(kl, reduction, mu):
    if reduction == "none":
        return kl
    total = kl.sum()
    return {"sum": total, "mean": total / max(mu.numel(), 1), "batchmean": total / (mu.shape[0] if mu.dim() else 1)
            }[reduction]


# ---------------------------------------------------------------- forward against the spec
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reparameterize_matches_reference(backend, dtype, shape):
    requires(backend, "reparameterize")
    mu, logvar = inputs(shape, dtype)
    z = torch.ops.fastvae.reparameterize(mu, logvar, seed_tensor())
    assert z.dtype == dtype and z.shape == mu.shape and z.is_contiguous()
    assert_close(z, reference.reparameterize(*as64(mu, logvar), seed_tensor()), dtype, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_kl_matches_torch_distributions(backend, dtype, reduction, shape):
    requires(backend, "gaussian_kl")
    mu, logvar = inputs(shape, dtype)
    kl = fastvae.gaussian_kl(mu, logvar, reduction=reduction)
    mu64, logvar64 = as64(mu, logvar)
    truth = kl_divergence(Normal(mu64, (0.5 * logvar64).exp()), Normal(torch.zeros_like(mu64), 1.0))
    assert kl.dtype == dtype and kl.shape == (mu.shape if reduction == "none" else ())
    assert_close(kl, reduce(truth, reduction, mu), dtype, scale=2)


PRIOR_SHAPES = {"full": lambda s: s, "row (D,)": lambda s: s[-1:], "column (B, 1)": lambda s: (s[0], 1),
                "scalar": lambda s: ()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["both", "mu only", "logvar only"])
@pytest.mark.parametrize("prior_shape", PRIOR_SHAPES)
def test_gaussian_kl_with_broadcast_prior(backend, dtype, which, prior_shape):
    requires(backend, "gaussian_kl", "gaussian_kl_backward")
    shape = (6, 37)
    mu, logvar = inputs(shape, dtype, requires_grad=True)
    pshape = PRIOR_SHAPES[prior_shape](shape)
    prior_mu = randn(*pshape, dtype=dtype, requires_grad=True) if which != "logvar only" else None
    prior_logvar = randn(*pshape, dtype=dtype, scale=0.5, requires_grad=True) if which != "mu only" else None
    kl = fastvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction="sum")
    leaves = [t for t in (mu, logvar, prior_mu, prior_logvar) if t is not None]
    grads = torch.autograd.grad(kl, leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    named = dict(zip([n for n, t in zip(("mu", "lv", "pm", "plv"), (mu, logvar, prior_mu, prior_logvar))
                      if t is not None], leaves64))
    truth = textbook_kl(named["mu"], named["lv"], named.get("pm"), named.get("plv")).sum()
    grads64 = torch.autograd.grad(truth, leaves64)
    assert_close(kl, truth, dtype, scale=2)
    for grad, grad64, leaf in zip(grads, grads64, leaves):
        assert grad.shape == leaf.shape  # prior gradients summed to the prior's own shape
        # a broadcast prior's gradient sums up to 37 or 6 rounded terms
        assert_close(grad, grad64, dtype, scale=8 if grad.numel() < mu.numel() else 2)


def test_gaussian_kl_prior_matches_torch_distributions(backend):
    requires(backend, "gaussian_kl")
    mu, logvar = inputs((5, 11), torch.float32)
    prior_mu, prior_logvar = randn(11), randn(5, 1, scale=0.5)
    kl = fastvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction="none")
    mu64, logvar64, pm64, plv64 = as64(mu, logvar, prior_mu, prior_logvar)
    truth = kl_divergence(Normal(mu64, (0.5 * logvar64).exp()), Normal(pm64, (0.5 * plv64).exp()))
    assert_close(kl, truth, torch.float32, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7, 13), (0, 4), (3, 5, 9)])
def test_reparameterize_kl_matches_reference(backend, dtype, reduction, shape):
    requires(backend, "reparameterize_kl")
    mu, logvar = inputs(shape, dtype)
    z, kl = torch.ops.fastvae.reparameterize_kl(mu, logvar, seed_tensor(), reduction)
    z_ref, kl_ref = reference.reparameterize_kl(*as64(mu, logvar), seed_tensor(), reduction)
    assert_close(z, z_ref, dtype, scale=2)
    assert_close(kl, kl_ref, dtype, scale=2)


@pytest.mark.parametrize("layout", ["non-contiguous", "row slices of one tensor", "transposed"])
def test_non_contiguous_inputs(backend, layout):
    requires(backend, *FORWARD_OPS, *BACKWARD_OPS)
    mu, logvar = inputs((9, 21), torch.float32)
    if layout == "non-contiguous":
        mu_in, logvar_in = non_contiguous(mu), non_contiguous(logvar)
    elif layout == "row slices of one tensor":  # an encoder's output split in two
        hidden = torch.cat([mu, logvar], dim=1)
        mu_in, logvar_in = hidden[:, :21], hidden[:, 21:]
    else:
        mu_in, logvar_in = mu.t().contiguous().t(), logvar.t().contiguous().t()
    seed = seed_tensor()
    for op, args in (("reparameterize", (seed,)), ("reparameterize_kl", (seed, "sum")),
                     ("gaussian_kl", (None, None, "none"))):
        expected = getattr(torch.ops.fastvae, op)(mu, logvar, *args)
        actual = getattr(torch.ops.fastvae, op)(mu_in, logvar_in, *args)
        for a, e in zip(actual if isinstance(actual, tuple) else (actual,),
                        expected if isinstance(expected, tuple) else (expected,)):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    grad = non_contiguous(randn(9, 21))
    z = torch.ops.fastvae.reparameterize(mu, logvar, seed)
    actual = torch.ops.fastvae.reparameterize_kl_backward(grad, torch.tensor(0.5), mu_in, logvar_in,
                                                          non_contiguous(z), seed, "mean")
    expected = reference.reparameterize_kl_backward(*as64(grad, torch.tensor(0.5), mu, logvar, z), seed, "mean")
    for a, e in zip(actual, expected):
        assert_close(a, e, torch.float32, scale=2)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (1,), (), (0, 4), (3, 5, 9)])
def test_reparameterize_gradients(backend, dtype, shape):
    requires(backend, "reparameterize", "reparameterize_backward")
    mu, logvar = inputs(shape, dtype, requires_grad=True)
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(3))
    grad_z = randn(*shape, dtype=dtype)
    g_mu, g_lv = torch.autograd.grad(z, (mu, logvar), grad_z)
    # The forward's noise, recovered in float64: backward must regenerate the same.
    mu64, logvar64 = (t.detach().double().requires_grad_() for t in (mu, logvar))
    eps = ((z.double() - mu64) / (0.5 * logvar64).exp()).detach()
    z64 = mu64 + (0.5 * logvar64).exp() * eps
    g_mu64, g_lv64 = torch.autograd.grad(z64, (mu64, logvar64), grad_z.double())
    assert_close(g_mu, g_mu64, dtype)
    # eps recovered from a rounded z carries z's rounding: tolerance of two roundings
    assert_close(g_lv, g_lv64, dtype, scale=4 if dtype == torch.float32 else 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7, 13), (0, 4), (3, 5, 9)])
def test_gaussian_kl_gradients(backend, dtype, reduction, shape):
    requires(backend, "gaussian_kl", "gaussian_kl_backward")
    mu, logvar = inputs(shape, dtype, requires_grad=True)
    kl = fastvae.gaussian_kl(mu, logvar, reduction=reduction)
    grad_kl = randn(*kl.shape, dtype=dtype)
    grads = torch.autograd.grad(kl, (mu, logvar), grad_kl)
    mu64, logvar64 = (t.detach().double().requires_grad_() for t in (mu, logvar))
    kl64 = reduce(textbook_kl(mu64, logvar64), reduction, mu)
    grads64 = torch.autograd.grad(kl64, (mu64, logvar64), grad_kl.double())
    for g, g64 in zip(grads, grads64):
        assert_close(g, g64, dtype, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reparameterize_kl_gradients(backend, dtype, reduction):
    requires(backend, "reparameterize_kl", "reparameterize_kl_backward")
    mu, logvar = inputs((5, 19), dtype, requires_grad=True)
    z, kl = fastvae.reparameterize_kl(mu, logvar, reduction=reduction, generator=torch.Generator().manual_seed(4))
    grad_z, grad_kl = randn(*z.shape, dtype=dtype), randn(*kl.shape, dtype=dtype)
    grads = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl))
    mu64, logvar64 = (t.detach().double().requires_grad_() for t in (mu, logvar))
    eps = ((z.double() - mu64) / (0.5 * logvar64).exp()).detach()
    z64 = mu64 + (0.5 * logvar64).exp() * eps
    kl64 = reduce(textbook_kl(mu64, logvar64), reduction, mu)
    grads64 = torch.autograd.grad((z64, kl64), (mu64, logvar64), (grad_z.double(), grad_kl.double()))
    for g, g64 in zip(grads, grads64):
        assert_close(g, g64, dtype, scale=4)


@pytest.mark.parametrize("lost_fraction", [0.0, 0.01, 0.5, 1.0])
def test_reparameterize_backward_noise_exact_where_mu_dwarfs_std(backend, lost_fraction):
    """A backend may recover std * eps as z - mu (native does, in float32); where |mu| >> std
    that difference has lost its digits and eps must be regenerated from the seed. Elements
    with |mu| / std ~ 1e6 are scattered at several densities (per-group and whole-block
    regeneration); the gradient must match the float64 spec to float32 rounding of std."""
    requires(backend, "reparameterize", "reparameterize_backward")
    n = 2053
    gen = torch.Generator().manual_seed(5)
    mu, logvar = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    lost = torch.rand(n, generator=gen) < lost_fraction
    mu, logvar = torch.where(lost, mu * 1e4, mu), torch.where(lost, logvar - 10.0, logvar)
    seed = seed_tensor()
    z = torch.ops.fastvae.reparameterize(mu, logvar, seed)
    grad_z = randn(n)
    (grad,) = torch.ops.fastvae.reparameterize_backward(grad_z, mu, logvar, z, seed, False)
    (expected,) = reference.reparameterize_backward(*as64(grad_z, mu, logvar, z), seed, False)
    error_in_std = (grad.double() - expected).abs() / (0.5 * grad_z.double().abs() * (0.5 * logvar.double()).exp())
    # Recovered: at most 2^-24 (8 + 2 |eps|); regenerated in float32: some ulps of the
    # Box-Muller radius. z - mu where |mu| / std ~ 1e6 would be off by ~0.1.
    assert error_in_std.max() <= 64 * 2.0**-24, error_in_std.max()


def test_reparameterize_backward_noise_exact_around_the_recovery_bound(backend):
    """Sparse elements with |mu| / std in [4, 32], around the bound of recovery (|mu| <= 8 std,
    where z - mu is off by at most 2^-24 (8 + 2 |eps|) std), among many well inside it. Each
    gradient must be within that of the float64 spec, plus the float32 rounding of
    regenerating the noise (some ulps of the Box-Muller radius r): a backend recovering
    z - mu where |mu| reaches 16 std is off by up to 2^-24 16 std, and is caught where r is
    small."""
    requires(backend, "reparameterize", "reparameterize_backward")
    n = 1 << 16
    gen = torch.Generator().manual_seed(11)
    logvar = 6 * torch.rand(n, generator=gen) - 3
    near_bound = torch.rand(n, generator=gen) < 0.04  # sparse: blocks redo them, not regenerate whole
    log2_ratio = torch.where(near_bound, 2 + 3 * torch.rand(n, generator=gen), -6 + 8 * torch.rand(n, generator=gen))
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    std = (0.5 * logvar.double()).exp()
    mu = (sign * 2.0**log2_ratio * std).float()
    seed = seed_tensor()
    z = torch.ops.fastvae.reparameterize(mu, logvar, seed)
    grad_z = torch.ones(n)
    (grad,) = torch.ops.fastvae.reparameterize_backward(grad_z, mu, logvar, z, seed, False)
    (expected,) = reference.reparameterize_backward(*as64(grad_z, mu, logvar, z), seed, False)
    eps = 2 * expected / std
    radius = eps.view(-1, 2).norm(dim=1).repeat_interleave(2)  # Box-Muller pairs share a radius
    error_in_std = (grad.double() - expected).abs() / (0.5 * std)
    allowed = 2.0**-24 * (8.1 + 2 * eps.abs() + 6 * radius)
    assert (error_in_std <= allowed).all(), (error_in_std / allowed).max()


def test_modifying_the_sample_in_place_before_backward_is_an_error():
    """The sampling ops save their output z for backward, as torch.exp does."""
    mu, logvar = inputs((3, 4), torch.float32, requires_grad=True)
    z = fastvae.reparameterize(mu, logvar)
    z.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_gaussian_kl_where_exp_leaves_the_normal_floats(backend):
    """Blocks holding a log-variance whose exp underflows to a subnormal or overflows to
    inf take the kernels' full-range exp (the cheap one covers |x| <= 87): the elementwise
    KL still matches the float64 spec, inf included."""
    requires(backend, "gaussian_kl", "reparameterize_kl")
    mu, logvar = randn(3, 700), randn(3, 700, scale=3.0)
    prior_mu, prior_logvar = randn(700), randn(700)
    logvar[0, 5], logvar[1, 300], logvar[2, 600] = -100.0, -95.0, 95.0
    prior_logvar[650] = -95.0  # exp(-prior_logvar) overflows
    for prior in ((None, None), (prior_mu, prior_logvar)):
        kl = torch.ops.fastvae.gaussian_kl(mu, logvar, *prior, "none")
        expected = reference.gaussian_kl(*as64(mu, logvar, *prior), "none").float()  # exp(95) overflows float32
        assert torch.isinf(expected).any()
        assert_close(kl, expected, torch.float32)
    _, kl = torch.ops.fastvae.reparameterize_kl(mu, logvar, seed_tensor(), "none")
    assert_close(kl, reference.gaussian_kl(*as64(mu, logvar), None, None, "none").float(), torch.float32)


def test_gaussian_kl_just_past_the_cheap_exp_range(backend):
    """The cheap exp covers |x| <= 87; a log-variance just past it either way (exp still a
    finite float32: 88.5 gives 2.7e38, -88.5 a subnormal) or NaN is noticed, and its block
    redone with the full-range exp."""
    requires(backend, "gaussian_kl")
    mu, logvar = randn(2, 600), randn(2, 600)
    logvar[0, 7], logvar[0, 550], logvar[1, 40], logvar[1, 590] = 87.5, -87.5, 88.5, -88.5
    kl = torch.ops.fastvae.gaussian_kl(mu, logvar, None, None, "none")
    expected = reference.gaussian_kl(*as64(mu, logvar), None, None, "none")
    assert torch.isfinite(kl).all()
    assert_close(kl, expected, torch.float32)
    logvar[1, 100] = float("nan")
    kl = torch.ops.fastvae.gaussian_kl(mu, logvar, None, None, "none")
    assert torch.isnan(kl[1, 100]) and torch.isnan(kl).sum() == 1


def test_samples_where_std_leaves_the_normal_floats(backend):
    """Blocks holding a log-variance whose std = exp(logvar / 2) is subnormal or overflows
    take the full-range exp: with mu = 0 there, z = std * eps is that subnormal (to its
    rounding) or an infinity of eps's sign, as in the float64 spec cast to float32."""
    requires(backend, "reparameterize", "reparameterize_kl")
    mu, logvar = randn(3, 700), randn(3, 700)
    special = [(0, 5, -190.0), (1, 300, -181.0), (2, 600, 190.0)]
    for row, col, value in special:
        mu[row, col], logvar[row, col] = 0.0, value
    expected = reference.reparameterize(*as64(mu, logvar), seed_tensor()).float()
    for z in (torch.ops.fastvae.reparameterize(mu, logvar, seed_tensor()),
              torch.ops.fastvae.reparameterize_kl(mu, logvar, seed_tensor(), "none")[0]):
        for row, col, value in special:
            got, want = z[row, col].item(), expected[row, col].item()
            if value > 0:
                assert got == want and abs(want) == float("inf"), (got, want)
            else:  # subnormal: a few ulps of 2^-149 on top of exp's relative rounding
                assert want != 0.0 and abs(got - want) <= 2e-3 * abs(want) + 8 * 2.0**-149, (got, want)
        others = torch.ones_like(mu, dtype=torch.bool)
        for row, col, _ in special:
            others[row, col] = False
        assert_close(z[others], expected[others], torch.float32, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_where_exp_leaves_the_normal_floats(backend, dtype):
    """The backwards' exps (exp(logvar), exp(-prior_logvar), the regenerated std) also leave
    the normal floats in places: the gradients still match the float64 spec there, inf
    included (float32), and the blocks around them are unaffected."""
    requires(backend, *BACKWARD_OPS)
    mu, logvar = randn(3, 700, dtype=dtype), randn(3, 700, dtype=dtype)
    prior_mu, prior_logvar = randn(700, dtype=dtype), randn(700, dtype=dtype)
    logvar[0, 5], logvar[1, 300], prior_logvar[650] = -100.0, -190.0, -95.0
    if dtype == torch.float32:  # exp(95) overflows float32 but not float64; half types overflow sooner
        logvar[2, 600] = 95.0
    grad = randn(3, 700, dtype=dtype)
    seed = seed_tensor()
    z = torch.ops.fastvae.reparameterize(mu, logvar, seed)
    pairs = [
        (torch.ops.fastvae.gaussian_kl_backward(grad, mu, logvar, None, None, "none"),
         reference.gaussian_kl_backward(*as64(grad, mu, logvar), None, None, "none")),
        (torch.ops.fastvae.gaussian_kl_backward(grad, mu, logvar, prior_mu, prior_logvar, "none"),
         reference.gaussian_kl_backward(*as64(grad, mu, logvar, prior_mu, prior_logvar), "none")),
        (torch.ops.fastvae.reparameterize_kl_backward(grad, grad, mu, logvar, z, seed, "none"),
         reference.reparameterize_kl_backward(*as64(grad, grad, mu, logvar, z), seed, "none")),
        (torch.ops.fastvae.reparameterize_backward(grad, mu, logvar, z, seed, False),
         reference.reparameterize_backward(*as64(grad, mu, logvar, z), seed, False)),
    ]
    for got, expected in pairs:
        for g, e in zip(got, expected):
            e = e.to(dtype)  # the spec's float64 rounded as the kernels' output is: inf where it overflows
            assert torch.equal(torch.isinf(g), torch.isinf(e))
            finite = ~torch.isinf(e)
            assert_close(g[finite], e[finite].double(), dtype, scale=4)


def test_expanded_output_gradients(backend):
    """autograd hands sum()'s gradient over as a stride-0 expanded tensor."""
    requires(backend, "reparameterize_kl", "reparameterize_kl_backward")
    mu, logvar = inputs((4, 33), torch.float32, requires_grad=True)
    z, kl = fastvae.reparameterize_kl(mu, logvar, reduction="none")
    (z.sum() + kl.sum()).backward()
    eps = (z.detach() - mu.detach()) / (0.5 * logvar.detach()).exp()
    std = (0.5 * logvar.detach()).exp()
    torch.testing.assert_close(mu.grad, 1.0 + mu.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar.grad, 0.5 * std * eps + 0.5 * (std * std - 1.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["expanded scalar", "expanded row", "transposed", "contiguous"])
def test_reparameterize_backward_writes_mu_gradient_on_request(backend, dtype, layout):
    """With dense_grad_mu the backward also returns mu's gradient, grad_z itself, as a new
    contiguous tensor (written in the same pass); logvar's gradient is unchanged."""
    requires(backend, "reparameterize", "reparameterize_backward")
    mu, logvar = inputs((6, 700), dtype)
    seed = seed_tensor()
    z = torch.ops.fastvae.reparameterize(mu, logvar, seed)
    grad_z = {"expanded scalar": randn(dtype=dtype).expand(6, 700), "expanded row": randn(700, dtype=dtype).expand(6, 700),
              "transposed": randn(700, 6, dtype=dtype).t(), "contiguous": randn(6, 700, dtype=dtype)}[layout]
    grad_mu, grad_logvar = torch.ops.fastvae.reparameterize_backward(grad_z, mu, logvar, z, seed, True)
    assert grad_mu.is_contiguous() and grad_mu.dtype == dtype and torch.equal(grad_mu, grad_z)
    assert grad_mu.data_ptr() != grad_z.data_ptr()
    (alone,) = torch.ops.fastvae.reparameterize_backward(grad_z, mu, logvar, z, seed, False)
    assert torch.equal(grad_logvar, alone)


def test_sum_of_the_sample_gives_dense_gradients(backend):
    """z.sum()'s gradient reaches the Function expanded; mu.grad comes out dense and exact."""
    requires(backend, "reparameterize", "reparameterize_backward")
    mu, logvar = inputs((5, 600), torch.float32, requires_grad=True)
    z = fastvae.reparameterize(mu, logvar)
    (3.0 * z.sum()).backward()
    assert mu.grad.is_contiguous() and torch.equal(mu.grad, torch.full_like(mu, 3.0))
    std = (0.5 * logvar.detach()).exp()
    torch.testing.assert_close(logvar.grad, 1.5 * (z.detach() - mu.detach()), rtol=1e-5, atol=1e-5 * std.max().item())
    only_mu = mu.detach().requires_grad_()
    fastvae.reparameterize(only_mu, logvar.detach()).sum().backward()
    assert torch.equal(only_mu.grad, torch.ones_like(mu))


# ---------------------------------------------------------------- the samplers' law
def _sample_count(backend):
    return 4096 if backend == "triton" else 1 << 18  # the Triton interpreter is slow


def test_samples_are_standard_normal(backend):
    requires(backend, "reparameterize")
    n = _sample_count(backend)
    mu, logvar = randn(n, scale=3.0), randn(n, scale=2.0)
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(11))
    standardised = ((z.double() - mu.double()) / (0.5 * logvar.double()).exp()).numpy()
    assert stats.kstest(standardised, "norm").pvalue > 1e-3
    x = torch.from_numpy(standardised)
    for lag in (1, 2, 4):  # within a Box-Muller pair, across pairs, across groups
        r = torch.corrcoef(torch.stack([x[:-lag], x[lag:]]))
        assert abs(r[0, 1].item()) < 5 / n**0.5


def test_calls_differ_and_seeds_reproduce(backend):
    requires(backend, "reparameterize", "reparameterize_kl")
    mu, logvar = inputs((3, 50), torch.float32)
    first, second = fastvae.reparameterize(mu, logvar), fastvae.reparameterize(mu, logvar)
    assert not torch.equal(first, second)
    gen = [fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(gen[0], gen[1])
    torch.manual_seed(123)
    a = fastvae.reparameterize_kl(mu, logvar)[0]
    torch.manual_seed(123)
    b = fastvae.reparameterize_kl(mu, logvar)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**62 + 12345])
def test_backends_share_one_stream(backend, seed):
    """For one seed tensor every backend gives the reference's noise, so each other's."""
    requires(backend, "reparameterize")
    n = 1027
    zeros = torch.zeros(n)
    eps = torch.ops.fastvae.reparameterize(zeros, zeros, seed_tensor(seed))
    expected = reference.normal_stream(seed_tensor(seed), (n,), "cpu", torch.float64)
    # Box-Muller's angle rounded in float32 moves a value by up to ~6 * 2**-22
    torch.testing.assert_close(eps.double(), expected, rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_kl_reductions_are_deterministic(backend, reduction):
    requires(backend, "gaussian_kl", "reparameterize_kl")
    shape = (64, 100) if backend == "triton" else (1000, 333)
    mu, logvar = inputs(shape, torch.float32)
    prior_mu = randn(shape[-1])
    runs = [fastvae.gaussian_kl(mu, logvar, prior_mu, reduction=reduction) for _ in range(2)]
    runs += [fastvae.reparameterize_kl(mu, logvar, reduction=reduction)[1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])


def test_native_reduction_independent_of_thread_count(backend):
    if backend != "native":
        pytest.skip("thread count is a native-backend matter")
    requires(backend, "gaussian_kl")
    mu, logvar = inputs((1000, 333), torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            results.append(fastvae.gaussian_kl(mu, logvar, reduction="sum"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_empty_batch_reductions(backend):
    requires(backend, "gaussian_kl")
    mu, logvar = inputs((0, 4), torch.float32)
    assert fastvae.gaussian_kl(mu, logvar, reduction="sum").item() == 0.0
    assert fastvae.gaussian_kl(mu, logvar, reduction="mean").item() == 0.0
    assert torch.isnan(fastvae.gaussian_kl(mu, logvar, reduction="batchmean"))  # 0 / 0, as the reference


# ---------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_matches_reference(backend, dtype, reduction):
    requires_on(backend, "cuda", *FORWARD_OPS, *BACKWARD_OPS, dtype=dtype)
    mu, logvar = inputs((333, 257), dtype, device="cuda")
    prior_mu, prior_logvar = randn(257, dtype=dtype, device="cuda"), randn(333, 1, dtype=dtype, device="cuda")
    seed = seed_tensor(device="cuda")
    z, kl = torch.ops.fastvae.reparameterize_kl(mu, logvar, seed, reduction)
    z_ref, kl_ref = reference.reparameterize_kl(*as64(mu, logvar), seed, reduction)
    assert_close(z, z_ref, dtype, scale=2)
    assert_close(kl, kl_ref, dtype, scale=2)
    kl = torch.ops.fastvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction)
    assert_close(kl, reference.gaussian_kl(*as64(mu, logvar, prior_mu, prior_logvar), reduction), dtype, scale=2)
    grad = randn(*kl.shape, dtype=dtype, device="cuda")
    grads = torch.ops.fastvae.gaussian_kl_backward(grad, mu, logvar, prior_mu, prior_logvar, reduction)
    for g, g64 in zip(grads, reference.gaussian_kl_backward(*as64(grad, mu, logvar, prior_mu, prior_logvar),
                                                            reduction)):
        assert_close(g, g64, dtype, scale=2)
    grad_z = randn(333, 257, dtype=dtype, device="cuda")
    grads = torch.ops.fastvae.reparameterize_kl_backward(grad_z, grad, mu, logvar, z, seed, reduction)
    for g, g64 in zip(grads, reference.reparameterize_kl_backward(*as64(grad_z, grad, mu, logvar, z), seed,
                                                                  reduction)):
        assert_close(g, g64, dtype, scale=2)


@pytest.mark.gpu
def test_cuda_samples_and_determinism(backend):
    requires_on(backend, "cuda", "reparameterize", "gaussian_kl")
    n = 1 << 20
    mu, logvar = randn(n, device="cuda"), randn(n, device="cuda")
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator("cuda").manual_seed(5))
    standardised = ((z.double() - mu.double()) / (0.5 * logvar.double()).exp()).cpu().numpy()
    assert stats.kstest(standardised, "norm").pvalue > 1e-3
    runs = [fastvae.gaussian_kl(mu, logvar, reduction="sum") for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    cpu_eps = reference.normal_stream(seed_tensor(9), (4099,), "cpu", torch.float64)
    zeros = torch.zeros(4099, device="cuda")
    eps = torch.ops.fastvae.reparameterize(zeros, zeros, seed_tensor(9, device="cuda"))
    torch.testing.assert_close(eps.double().cpu(), cpu_eps, rtol=1e-5, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_shapes_layouts_and_half_prior(backend, shape):
    """Group tails, 0-d and empty tensors; strided, unaligned and vector-load paths; a
    prior given as a broadcast mean alone: each against the float64 spec."""
    requires_on(backend, "cuda", *FORWARD_OPS, *BACKWARD_OPS)
    mu, logvar = inputs(shape, torch.float32, device="cuda")
    prior_mu = randn(*shape[-1:], device="cuda")  # (D,), or a scalar for a 0-d mu
    seed = seed_tensor(device="cuda")
    unaligned = [torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view(shape) for t in (mu, logvar)]
    layouts = {"contiguous": (mu, logvar), "non-contiguous": (non_contiguous(mu), non_contiguous(logvar)),
               "unaligned": unaligned}
    for mu_in, logvar_in in layouts.values():
        z = torch.ops.fastvae.reparameterize(mu_in, logvar_in, seed)
        assert_close(z, reference.reparameterize(*as64(mu, logvar), seed), torch.float32, scale=2)
        grad_z = randn(*shape, device="cuda")
        (grad,) = torch.ops.fastvae.reparameterize_backward(grad_z, mu_in, logvar_in, z, seed, False)
        assert_close(grad, reference.reparameterize_backward(*as64(grad_z, mu, logvar, z), seed, False)[0],
                     torch.float32, scale=2)
        column_major = grad_z.t().contiguous().t() if grad_z.dim() == 2 else grad_z
        grad_mu, grad_logvar = torch.ops.fastvae.reparameterize_backward(column_major, mu_in, logvar_in, z, seed, True)
        assert grad_mu.is_contiguous() and torch.equal(grad_mu, grad_z) and torch.equal(grad_logvar, grad)
        for reduction in REDUCTIONS:
            kl = torch.ops.fastvae.gaussian_kl(mu_in, logvar_in, prior_mu, None, reduction)
            assert_close(kl, reference.gaussian_kl(*as64(mu, logvar, prior_mu), None, reduction), torch.float32,
                         scale=2)
            grad = randn(*kl.shape, device="cuda")
            grads = torch.ops.fastvae.gaussian_kl_backward(grad, mu_in, logvar_in, prior_mu, None, reduction)
            expected = reference.gaussian_kl_backward(*as64(grad, mu, logvar, prior_mu), None, reduction)
            for g, g64 in zip(grads, expected):
                assert_close(g, g64, torch.float32, scale=2)
