"""Gumbel column on every backend: gumbel_softmax (soft, hard, straight-through backward)
and categorical_kl, against fastvae.reference in float64, F.gumbel_softmax's behaviour,
torch.distributions and the sampling law (chi-square)."""
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from torch.distributions import Categorical, kl_divergence

import fastvae
from fastvae import reference
from fastvae.ops._common import REDUCTIONS, draw_seed

from helpers import DTYPES, as64, assert_close, non_contiguous, randn, requires, requires_on

GUMBEL_OPS = ("gumbel_softmax", "gumbel_softmax_backward", "gumbel_softmax_backward_from_sample")
KL_OPS = ("categorical_kl", "categorical_kl_backward")
# (shape, dim): odd K, K = 1, wide rows, and dim first / middle / last
CASES = [((4, 1), -1), ((5, 3), -1), ((3, 7), 1), ((4, 33), -1), ((2, 1000), -1), ((2, 5, 3, 4), 1),
         ((6, 2, 3), 0), ((3, 70, 2), 1)]
# (shape, dim) of the backward from the sample: dims 0, 1 and last of (B, K, H, W), K = 1,
# rows of the row-at-a-time layout (K >= 32) and wider than a Triton tile (K = 9000)
FROM_SAMPLE_CASES = [((2, 5, 3, 4), 0), ((2, 5, 3, 4), 1), ((2, 5, 3, 4), -1), ((4, 1), -1), ((5, 3), -1),
                     ((4, 33), -1), ((3, 70, 2), 1), ((2, 9000), -1), ((2, 9000, 3), 1)]
NEG_INF = float("-inf")


def _generator(seed=1234):
    return torch.Generator().manual_seed(seed)


def _seed_tensor(seed=1234):
    """The seed tensor a call with ``generator=_generator(seed)`` draws."""
    return draw_seed(torch.device("cpu"), _generator(seed))


def _case_id(case):
    return f"{'x'.join(map(str, case[0]))}-dim{case[1]}"


# ---------------------------------------------------------------- gumbel_softmax vs the reference
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_gumbel_softmax_matches_reference(backend, case, dtype, hard):
    requires(backend, *GUMBEL_OPS)
    shape, dim = case
    logits = randn(*shape, dtype=dtype, scale=2.0, requires_grad=True)
    tau = 0.7
    y = fastvae.gumbel_softmax(logits, tau, hard, dim=dim, generator=_generator())
    assert y.shape == logits.shape and y.dtype == dtype
    assert backend == "torch" or y.is_contiguous()  # the reference returns a movedim view
    expected = reference.gumbel_softmax(*as64(logits), _seed_tensor(), tau, hard, dim % len(shape))
    if hard:
        assert torch.equal(y.double(), expected)
    else:
        assert_close(y, expected, dtype)
    grad_y = randn(*shape, dtype=dtype)
    y.backward(grad_y)
    expected_grad = reference.gumbel_softmax_backward(*as64(grad_y, logits), _seed_tensor(), tau, dim % len(shape))
    assert_close(logits.grad, expected_grad, dtype, scale=2.0)


@pytest.mark.parametrize("dim", [1, -1])
def test_gumbel_softmax_non_contiguous_input_and_grad(backend, dim):
    requires(backend, *GUMBEL_OPS)
    base = randn(3, 9, 5)
    logits = non_contiguous(base).requires_grad_()
    y = fastvae.gumbel_softmax(logits, 0.5, dim=dim, generator=_generator())
    assert_close(y, reference.gumbel_softmax(*as64(base), _seed_tensor(), 0.5, False, dim % 3), torch.float32)
    grad_y = non_contiguous(randn(3, 9, 5))
    y.backward(grad_y)
    expected = reference.gumbel_softmax_backward(*as64(grad_y, base), _seed_tensor(), 0.5, dim % 3)
    assert_close(logits.grad, expected, torch.float32)


def test_gumbel_softmax_wide_rows_use_an_online_softmax(backend):
    """Rows wider than one tile (K = 9000 > 8192) and a broadcast (stride 0) gradient."""
    requires(backend, *GUMBEL_OPS)
    logits = randn(2, 9000, scale=3.0, requires_grad=True)
    seed = _seed_tensor()
    for hard in (False, True):
        y = fastvae.gumbel_softmax(logits, 0.3, hard, generator=_generator())
        expected = reference.gumbel_softmax(*as64(logits), seed, 0.3, hard, 1)
        if hard:
            assert torch.equal(y.double(), expected)
        else:
            assert_close(y, expected, torch.float32)
    y.sum(dim=0).backward(torch.linspace(-1, 1, 9000))  # grad_y is a stride-0 broadcast over rows
    grad_y = torch.linspace(-1, 1, 9000, dtype=torch.float64).expand(2, 9000)
    assert_close(logits.grad, reference.gumbel_softmax_backward(grad_y, *as64(logits), seed, 0.3, 1), torch.float32)


def test_backends_agree_for_one_seed():
    """Same seed tensor -> native and triton give the reference's sample (so each other's)."""
    kernels = [name for name in ("native", "triton") if name in fastvae.available_backends()]
    if len(kernels) < 2:
        pytest.skip("needs both the native and the triton backend")
    logits = randn(2, 6, 3, 5)
    seed = torch.tensor([0x1234_5678_9ABC_DEF], dtype=torch.int64)
    for hard in (False, True):
        outs = []
        for name in kernels:
            with fastvae.use_backend(name):
                outs.append(torch.ops.fastvae.gumbel_softmax(logits, seed, torch.tensor([0.9]), hard, 1))
        if hard:
            assert torch.equal(outs[0], outs[1])
        else:
            torch.testing.assert_close(outs[0], outs[1], atol=2e-6, rtol=2e-6)


# ---------------------------------------------------------------- soft backward from the sample
def _soft_sample(shape, dim, dtype):
    """A soft sample along ``dim`` whose first row is all 0 (what an all -inf row gives)."""
    rows = torch.softmax(randn(*shape, scale=2.0), dim).movedim(dim, -1).contiguous()
    rows.view(-1, shape[dim])[0] = 0.0
    return rows.movedim(-1, dim).contiguous().to(dtype)


@pytest.mark.parametrize("case", FROM_SAMPLE_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_from_sample_matches_reference(backend, case, dtype):
    requires(backend, "gumbel_softmax_backward_from_sample")
    shape, dim = case
    y, grad_y = _soft_sample(shape, dim, dtype), randn(*shape, dtype=dtype)
    got = torch.ops.fastvae.gumbel_softmax_backward_from_sample(grad_y, y, torch.tensor([0.7]), dim % len(shape))
    assert got.shape == y.shape and got.dtype == dtype
    assert backend == "torch" or got.is_contiguous()
    expected = reference.gumbel_softmax_backward_from_sample(*as64(grad_y, y), 0.7, dim % len(shape))
    assert_close(got, expected, dtype, scale=2.0)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_backward_from_sample_strided_and_broadcast_grad(backend, dim):
    """Non-contiguous y and grad_y, a y laid out with ``dim`` innermost in memory (a movedim
    view), and the stride-0 grad_y that autograd passes for a ``.sum()`` loss."""
    requires(backend, "gumbel_softmax_backward_from_sample")
    shape, d = (3, 40, 5), dim % 3
    y = _soft_sample(shape, dim, torch.float32)
    ys = [non_contiguous(y), y.movedim(d, -1).contiguous().movedim(-1, d)]
    grads = [non_contiguous(randn(*shape)), torch.ones(()).expand(shape), torch.linspace(-1, 1, 5).expand(shape)]
    for y_view in ys:
        for grad_y in grads:
            got = torch.ops.fastvae.gumbel_softmax_backward_from_sample(grad_y, y_view, torch.tensor([0.4]), d)
            expected = reference.gumbel_softmax_backward_from_sample(*as64(grad_y, y), 0.4, d)
            assert_close(got, expected, torch.float32)


def test_soft_backward_holds_only_the_sample(backend):
    """hard=False keeps the output for backward, not the logits: changing the logits after
    forward leaves the gradient as it was, and nothing else is held."""
    requires(backend, *GUMBEL_OPS)
    logits = randn(6, 9, 4, requires_grad=True)
    saved = []  # what autograd keeps for backward, however the op's Function is written (Python or C++)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fastvae.gumbel_softmax(logits, 0.5, dim=1, generator=_generator())
    assert saved[0].data_ptr() == y.data_ptr() and len(saved) == 2 and saved[1].numel() == 1  # y and tau
    weights = randn(6, 9, 4)
    expected = reference.gumbel_softmax_backward(*as64(weights, logits), _seed_tensor(), 0.5, 1)
    with torch.no_grad():
        logits.fill_(float("nan"))
    (y * weights).sum().backward()
    assert_close(logits.grad, expected, torch.float32)


# ---------------------------------------------------------------- F.gumbel_softmax's own checks
@pytest.mark.parametrize("shape,dim", [((5,), 0), ((10, 3), -1), ((2, 4, 3), 1)])
def test_gumbel_softmax_behaves_like_torch(backend, shape, dim):
    """The cases PyTorch's test_gumbel_softmax checks: shape, range, sums to 1, hard is
    one-hot with sum exactly 1, straight-through gradient equals the soft gradient."""
    requires(backend, *GUMBEL_OPS)
    logits = randn(*shape, requires_grad=True)
    soft = fastvae.gumbel_softmax(logits, dim=dim, generator=_generator(7))
    hard = fastvae.gumbel_softmax(logits, hard=True, dim=dim, generator=_generator(7))
    assert soft.shape == hard.shape == logits.shape
    assert ((soft >= 0) & (soft <= 1)).all()
    torch.testing.assert_close(soft.sum(dim), torch.ones_like(soft.sum(dim)))
    assert torch.equal(hard.sum(dim), torch.ones_like(hard.sum(dim)))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.argmax(dim), soft.argmax(dim))
    weights = randn(*shape)
    grad_soft, = torch.autograd.grad((soft * weights).sum(), logits)
    grad_hard, = torch.autograd.grad((hard * weights).sum(), logits)
    torch.testing.assert_close(grad_hard, grad_soft)
    assert grad_soft.abs().sum() > 0


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_gradient_equals_float64_autograd(backend, hard):
    """Backward against autograd through the textbook formula softmax((x + g) / tau) in float64."""
    requires(backend, *GUMBEL_OPS)
    logits = randn(4, 6, 5, requires_grad=True)
    weights = randn(4, 6, 5)
    y = fastvae.gumbel_softmax(logits, 0.6, hard, dim=1, generator=_generator())
    got, = torch.autograd.grad((y * weights).sum(), logits)
    x64 = logits.detach().double().requires_grad_()
    noise = reference.gumbel_stream(_seed_tensor(), 20, 6, "cpu", torch.float64).reshape(4, 5, 6).movedim(-1, 1)
    soft = torch.softmax((x64 + noise) / 0.6, dim=1)
    expected, = torch.autograd.grad((soft * weights.double()).sum(), x64)
    assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("case", [((4, 6, 5), 1), ((3, 40), -1)], ids=_case_id)
def test_tensor_tau_gradient_equals_float64_autograd(backend, hard, case):
    """A learned temperature: tau's gradient (and the logits') against autograd of the
    textbook formula softmax((x + g) / tau) in float64; masked classes included."""
    requires(backend, *GUMBEL_OPS)
    shape, dim = case
    logits = randn(*shape, scale=2.0)
    logits.select(dim, 1).fill_(NEG_INF)
    logits.requires_grad_()
    tau = torch.tensor(0.6, requires_grad=True)
    weights = randn(*shape)
    y = fastvae.gumbel_softmax(logits, tau, hard, dim=dim, generator=_generator())
    got = torch.autograd.grad((y * weights).sum(), (logits, tau))
    x64, tau64 = logits.detach().double().requires_grad_(), tau.detach().double().requires_grad_()
    # masked classes as a large finite negative: y = 0 there, and autograd meets no inf / inf
    moved = torch.where(torch.isinf(x64), -1e4, x64).movedim(dim, -1)
    noise = reference.gumbel_stream(_seed_tensor(), moved.numel() // moved.shape[-1], moved.shape[-1], "cpu",
                                    torch.float64).reshape(moved.shape)
    soft = torch.softmax((moved + noise) / tau64, dim=-1).movedim(-1, dim)
    expected = torch.autograd.grad((soft * weights.double()).sum(), (x64, tau64))
    assert got[1].shape == tau.shape
    assert_close(got[0], expected[0], torch.float32)
    assert_close(got[1], expected[1], torch.float32, scale=4)  # a sum over every element


def test_tensor_tau_values_and_no_host_read(backend):
    """A tensor tau gives the float tau's sample, and is never read on the host (.item()
    under fake tensors raises)."""
    requires(backend, "gumbel_softmax")
    logits = randn(5, 9)
    for hard in (False, True):
        expected = fastvae.gumbel_softmax(logits, 0.3, hard, generator=_generator())
        torch.testing.assert_close(fastvae.gumbel_softmax(logits, torch.tensor([0.3]), hard, generator=_generator()),
                                   expected)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake_logits = torch.empty(5, 9)
        assert fastvae.gumbel_softmax(fake_logits, torch.full((), 0.3)).shape == (5, 9)
    with pytest.raises(ValueError, match="tau"):
        fastvae.gumbel_softmax(logits, torch.tensor([0.3, 0.4]))


def test_argmax_frequencies_follow_softmax(backend):
    """Chi-square: over many draws, argmax(logits + g) is class k with probability softmax(logits)_k."""
    requires(backend, "gumbel_softmax")
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -3.0, 0.25])
    draws = 20000
    samples = fastvae.gumbel_softmax(logits.expand(draws, -1), hard=True, generator=_generator(99))
    counts = samples.sum(dim=0).double()
    assert counts.sum() == draws
    expected = torch.softmax(logits.double(), dim=0) * draws
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


# ---------------------------------------------------------------- numerics: masks, extremes
def test_masked_classes_are_never_sampled(backend):
    requires(backend, *GUMBEL_OPS)
    logits = randn(500, 6, scale=3.0)
    logits[:, [1, 4]] = NEG_INF
    logits[7] = NEG_INF  # a row with nothing to sample
    logits.requires_grad_()
    for hard in (False, True):
        y = fastvae.gumbel_softmax(logits, 0.5, hard, generator=_generator())
        assert torch.isfinite(y).all()
        assert torch.equal(y[:, [1, 4]], torch.zeros(500, 2))
        assert torch.equal(y[7], torch.zeros(6))
        live = torch.ones(500, dtype=torch.bool)
        live[7] = False
        torch.testing.assert_close(y[live].sum(1), torch.ones(499))
    y.backward(randn(500, 6))
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[7], torch.zeros(6)) and torch.equal(logits.grad[:, [1, 4]], torch.zeros(500, 2))


@pytest.mark.parametrize("tau", [0.05, 50.0])
def test_large_logits_and_extreme_tau_stay_finite(backend, tau):
    requires(backend, *GUMBEL_OPS)
    logits = randn(16, 40, scale=1e4, requires_grad=True)
    y = fastvae.gumbel_softmax(logits, tau, generator=_generator())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.sum(1), torch.ones(16))
    # float32 rounding of logits ~1e4 is amplified by 1/tau: compare loosely
    expected = reference.gumbel_softmax(*as64(logits), _seed_tensor(), tau, False, 1)
    torch.testing.assert_close(y.double(), expected, atol=1e-3, rtol=1e-3)
    y.backward(randn(16, 40))
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- seeds
def test_seeds_reproduce(backend):
    requires(backend, "gumbel_softmax")
    logits = randn(8, 11)
    a = fastvae.gumbel_softmax(logits, generator=_generator(5))
    assert torch.equal(a, fastvae.gumbel_softmax(logits, generator=_generator(5)))
    assert not torch.equal(a, fastvae.gumbel_softmax(logits, generator=_generator(6)))
    torch.manual_seed(3)
    b = fastvae.gumbel_softmax(logits)
    c = fastvae.gumbel_softmax(logits)
    torch.manual_seed(3)
    assert torch.equal(b, fastvae.gumbel_softmax(logits)) and not torch.equal(b, c)


# ---------------------------------------------------------------- categorical_kl
def _kl_truth(logits, prior_logits, dim, reduction):
    """KL by torch.distributions, reduced as the API documents."""
    p = Categorical(logits=logits.movedim(dim, -1))
    q = Categorical(logits=torch.zeros(logits.shape[dim], dtype=logits.dtype) if prior_logits is None
                    else prior_logits.expand(logits.shape).movedim(dim, -1))
    kl = kl_divergence(p, q)
    if reduction == "none":
        return kl
    total = kl.sum()
    return {"sum": total, "mean": total / kl.numel(), "batchmean": total / logits.shape[0]}[reduction]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", [None, "full", "classes", "batch"])
@pytest.mark.parametrize("dim", [1, -1])
def test_categorical_kl_matches_torch_distributions(backend, reduction, prior, dim):
    """Uniform prior, a full prior and priors broadcast over the other dims or the batch."""
    requires(backend, *KL_OPS)
    shape = (3, 7, 5)
    prior_shape = {None: None, "full": shape, "classes": (7, 1) if dim == 1 else (5,), "batch": (1, 7, 5)}[prior]
    logits = randn(*shape, requires_grad=True)
    prior = None if prior_shape is None else randn(*prior_shape, requires_grad=True)
    kl = fastvae.categorical_kl(logits, prior, dim=dim, reduction=reduction)
    logits64, prior64 = (None if t is None else t.detach().double().requires_grad_() for t in (logits, prior))
    truth = _kl_truth(logits64, prior64, dim, reduction)
    assert kl.shape == truth.shape
    assert_close(kl, truth, torch.float32, scale=2.0)
    grad = torch.randn(truth.shape)
    leaves = [t for t in (logits, prior) if t is not None]
    got = torch.autograd.grad(kl, leaves, grad)
    expected = torch.autograd.grad(truth, [t for t in (logits64, prior64) if t is not None], grad.double())
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert_close(g, e, torch.float32, scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_categorical_kl_dtypes_and_masks(backend, dtype):
    requires(backend, *KL_OPS)
    logits = randn(6, 33, dtype=dtype, scale=2.0)
    logits[:, ::5] = NEG_INF  # masked classes contribute 0
    logits[4] = NEG_INF  # no distribution at all: KL 0, and no gradient to logits or prior
    prior = randn(33, dtype=dtype)
    for prior_logits in (None, prior):
        kl = fastvae.categorical_kl(logits, prior_logits, reduction="none")
        assert kl.dtype == dtype
        expected = reference.categorical_kl(*as64(logits, prior_logits), 1, "none")
        assert_close(kl, expected, dtype, scale=2.0)
        grads = torch.ops.fastvae.categorical_kl_backward(torch.ones(6, dtype=dtype), logits, prior_logits, 1, "none")
        expected_grads = reference.categorical_kl_backward(torch.ones(6, dtype=torch.float64),
                                                           *as64(logits, prior_logits), 1, "none")
        for g, e in zip(grads, expected_grads):
            assert torch.isfinite(g).all()
            assert_close(g, e, dtype, scale=2.0)
        assert torch.equal(grads[0][:, ::5].float(), torch.zeros(6, 7))
        assert kl[4] == 0 and all(torch.equal(g[4].float(), torch.zeros(33)) for g in grads)


def test_categorical_kl_uniform_logits_give_zero(backend):
    requires(backend, "categorical_kl")
    logits = torch.full((4, 10), 3.0)
    assert fastvae.categorical_kl(logits, reduction="sum").abs() < 1e-6
    assert fastvae.categorical_kl(logits, torch.zeros(10), reduction="sum").abs() < 1e-6


def test_categorical_kl_wide_rows_and_large_logits(backend):
    requires(backend, *KL_OPS)
    logits = randn(2, 9000, scale=1e4, requires_grad=True)
    prior = randn(2, 9000, scale=10.0)
    kl = fastvae.categorical_kl(logits, prior, reduction="none")
    assert torch.isfinite(kl).all()
    assert_close(kl, reference.categorical_kl(*as64(logits, prior), 1, "none"), torch.float32, scale=10.0)
    kl.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(backend, dtype, hard):
    requires_on(backend, "cuda", *GUMBEL_OPS, *KL_OPS, dtype=dtype)
    for shape, dim in [((64, 1000), -1), ((4, 33, 8, 8), 1), ((3, 70000), -1)]:
        logits = randn(*shape, dtype=dtype, device="cuda", requires_grad=True)
        seed = torch.tensor([42], dtype=torch.int64, device="cuda")
        y = torch.ops.fastvae.gumbel_softmax(logits, seed, torch.tensor([0.5]), hard, dim % len(shape))
        expected = reference.gumbel_softmax(logits.detach().double(), seed, 0.5, hard, dim % len(shape))
        if hard:
            assert torch.equal(y.double(), expected)
        else:
            assert_close(y, expected, dtype)
        kl = fastvae.categorical_kl(logits, dim=dim, reduction="none")
        assert_close(kl, reference.categorical_kl(logits.detach().double(), None, dim % len(shape), "none"), dtype,
                     scale=2.0)
