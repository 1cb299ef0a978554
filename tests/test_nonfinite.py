"""NaN, inf, extreme tau, overflow and ties on every backend, as the README's "Non-finite
inputs" section defines them (the reference, fastvae/reference.py, is the spec):

* gumbel_softmax: a row holding a NaN or +inf logit is all NaN (soft and hard, and its
  gradient), as F.gumbel_softmax; -inf is a mask; an all -inf row is zeros; every tau > 0
  computes (tiny: the one-hot of the argmax, huge: uniform over the unmasked classes).
* categorical_kl: NaN for a row whose logits or prior hold a NaN or +inf; +inf where the
  logits have mass the prior forbids (an all -inf prior row too); 0 for all -inf logits.
* nearest_code: the argmin of the exact distances as torch.argmin takes it: a NaN distance
  ranks first (a NaN row takes code 0, a NaN code is every row's nearest, sq_dist NaN),
  ties go to the lowest index, all-inf rows included.

Each check takes the device, so the `gpu` tests run the same checks on CUDA, where the
hardware's max/min drop NaN instead of propagating it as the interpreter does.
"""
import pytest
import torch

import fastvae
from fastvae import reference
from fastvae.ops._common import draw_seed

from helpers import as64, assert_close, randn, requires, requires_on

GUMBEL_OPS = ("gumbel_softmax", "gumbel_softmax_backward", "gumbel_softmax_backward_from_sample")
KL_OPS = ("categorical_kl", "categorical_kl_backward")
VQ_OPS = ("nearest_code", "vector_quantize")
NAN, INF = float("nan"), float("inf")
# (shape, dim): the native kernel's eight-rows-per-vector layout (narrow K, and dim not
# last), its row-at-a-time layout (K >= 32), and rows wider than a Triton tile
GUMBEL_CASES = [((6, 5), -1), ((6, 40), -1), ((2, 6, 3), 1), ((6, 9000), -1)]
NAN_ROWS = [0, 1, 2]


def _generator():
    return torch.Generator().manual_seed(1234)


def _seed(device):
    """The seed tensor a call with ``generator=_generator()`` draws."""
    return draw_seed(torch.device(device), _generator())


def _rows_view(t, dim):
    return t.movedim(dim, -1).reshape(-1, t.shape[dim])


def _special_logits(shape, dim, device):
    """Logits whose rows (along ``dim``) are: a NaN, a +inf, a NaN beside -inf, all -inf,
    half masked, and ordinary ones."""
    logits = randn(*shape, scale=2.0).movedim(dim, -1).contiguous()
    rows = logits.view(-1, shape[dim])
    k = rows.shape[1]
    rows[0, k // 2] = NAN
    rows[1, k - 1] = INF
    rows[2, 0], rows[2, k - 1] = -INF, NAN
    rows[3] = -INF
    rows[4, ::2] = -INF
    return logits.movedim(-1, dim).to(device)


def _assert_same_with_nan(actual, expected, exact=False):
    assert torch.equal(actual.isnan(), expected.isnan())
    keep = ~expected.isnan()
    if exact:
        assert torch.equal(actual[keep].double(), expected[keep].double())
    else:
        assert_close(actual[keep], expected[keep], torch.float32, scale=2.0)


def check_gumbel_nan_rows(shape, dim, hard, device):
    dim = dim % len(shape)
    logits = _special_logits(shape, dim, device).requires_grad_()
    y = fastvae.gumbel_softmax(logits, 0.7, hard, dim=dim, generator=_generator())
    expected = reference.gumbel_softmax(*as64(logits), _seed(device), 0.7, hard, dim)
    rows = _rows_view(expected, dim)
    assert rows[NAN_ROWS].isnan().all() and not rows[3:].isnan().any()  # the spec itself
    assert torch.equal(rows[3], torch.zeros_like(rows[3]))
    _assert_same_with_nan(y, expected, exact=hard)
    grad_y = randn(*shape, device=device)
    y.backward(grad_y)
    expected_grad = reference.gumbel_softmax_backward(*as64(grad_y, logits), _seed(device), 0.7, dim)
    assert _rows_view(expected_grad, dim)[NAN_ROWS].isnan().all()
    _assert_same_with_nan(logits.grad, expected_grad)


@pytest.mark.parametrize("case", GUMBEL_CASES, ids=str)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_gumbel_softmax_nan_or_posinf_logit_gives_nan_row(backend, case, hard):
    requires(backend, *GUMBEL_OPS)
    check_gumbel_nan_rows(*case, hard, "cpu")


def check_extreme_tau(tau, device):
    logits = _special_logits((6, 40), 1, device)[3:].requires_grad_()  # all -inf, half masked, ordinary
    soft = fastvae.gumbel_softmax(logits, tau, generator=_generator())
    expected = reference.gumbel_softmax(*as64(logits), _seed(device), tau, False, 1)
    assert torch.isfinite(soft).all()
    assert_close(soft, expected, torch.float32)
    if tau < 1:  # the limit: the hard sample's one-hot
        hard = fastvae.gumbel_softmax(logits, tau, True, generator=_generator())
        assert torch.equal(soft, hard)
    else:  # the limit: uniform over the unmasked classes
        unmasked = (logits > -INF).double()
        uniform = unmasked / unmasked.sum(1, keepdim=True).clamp(min=1)
        assert_close(soft, uniform, torch.float32)
    soft.backward(randn(3, 40, device=device))
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("tau", [1e-30, 1e-39, 1e-45, 1e-300, 1e30, 1e300])
def test_gumbel_softmax_computes_every_positive_tau(backend, tau):
    requires(backend, *GUMBEL_OPS)
    check_extreme_tau(tau, "cpu")


def check_categorical_kl_nonfinite(k, dim, device):
    """Rows of (6, k) logits and prior, laid out along ``dim`` of a (6, k) or (k, 6) view."""
    logits, prior = randn(6, k, device=device), randn(6, k, device=device)
    logits[0, 1], logits[1, 2], prior[2, 0] = NAN, INF, NAN  # NaN rows
    prior[3] = -INF  # a prior with no mass: +inf
    logits[4] = -INF  # logits with no mass: 0
    if dim == 0:
        logits, prior = logits.t(), prior.t()
    logits.requires_grad_()
    for prior_logits in (None, prior):
        kl = fastvae.categorical_kl(logits, prior_logits, dim=dim, reduction="none")
        expected = reference.categorical_kl(*as64(logits, prior_logits), dim, "none")
        nan_rows = [0, 1] if prior_logits is None else NAN_ROWS
        assert expected[nan_rows].isnan().all() and not expected[3:].isnan().any()  # the spec itself
        assert expected[4] == 0 and (prior_logits is None or expected[3] == INF)
        _assert_same_with_nan(kl, expected)
        for reduction in ("sum", "mean", "batchmean"):
            assert fastvae.categorical_kl(logits, prior_logits, dim=dim, reduction=reduction).isnan()
        grads = torch.ops.fastvae.categorical_kl_backward(torch.ones(6, device=device), logits.detach(),
                                                          prior_logits, dim, "none")
        expected_grads = reference.categorical_kl_backward(torch.ones(6, dtype=torch.float64, device=device),
                                                           *as64(logits, prior_logits), dim, "none")
        live = [0, 1, 2, 4, 5]  # the gradient of an infinite KL (row 3) is left open
        for g, e in zip(grads, expected_grads):
            g, e = _rows_view(g, dim)[live], _rows_view(e, dim)[live]
            assert e[:len(nan_rows)].isnan().all() and torch.equal(e[3], torch.zeros_like(e[3]))
            _assert_same_with_nan(g, e)


@pytest.mark.parametrize("k,dim", [(5, 1), (40, 1), (7, 0), (5000, 1)], ids=str)
def test_categorical_kl_nan_inf_and_masked_rows(backend, k, dim):
    requires(backend, *KL_OPS)
    check_categorical_kl_nonfinite(k, dim, "cpu")


def check_nearest_code_nonfinite(k, d, device):
    x, codebook = randn(7, d, device=device), randn(k, d, device=device)
    x[2, 1] = NAN  # every distance NaN: code 0
    x[4, 0] = INF  # every distance +inf: the lowest index, 0
    codebook[k // 2, d - 1] = INF  # never nearest to a finite row
    indices, sq_dist = fastvae.nearest_code(x, codebook)
    expected = reference.nearest_code(*as64(x.cpu(), codebook.cpu()))
    assert expected[0][[2, 4]].tolist() == [0, 0] and expected[1][2].isnan() and expected[1][4] == INF
    assert torch.equal(indices.cpu(), expected[0])
    _assert_same_with_nan(sq_dist.cpu(), expected[1])
    codebook[k - 2, 0] = NAN  # a NaN code is every row's nearest (code 0 for the NaN row)
    indices, sq_dist = fastvae.nearest_code(x, codebook)
    expected = reference.nearest_code(*as64(x.cpu(), codebook.cpu()))
    assert expected[0].tolist() == [k - 2, k - 2, 0, k - 2, k - 2, k - 2, k - 2]
    assert expected[1].isnan().all()
    assert torch.equal(indices.cpu(), expected[0]) and sq_dist.isnan().all()
    quantized, indices, loss = fastvae.vector_quantize(x, codebook)
    assert torch.equal(indices.cpu(), expected[0]) and loss.isnan()
    assert torch.equal(quantized.isnan(), codebook[indices].isnan())


@pytest.mark.parametrize("k,d", [(9, 4), (9, 33), (300, 8)], ids=str)
def test_nearest_code_nan_and_inf(backend, k, d):
    requires(backend, *VQ_OPS)
    check_nearest_code_nonfinite(k, d, "cpu")


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
def test_vector_quantize_unused_codes_get_zero_gradient_from_an_infinite_loss_gradient(backend, estimator):
    # The reference adds the rows' terms into zeros: a code no row chose gets exactly 0,
    # never inf * 0 = NaN, whatever the loss's gradient.
    backward = "vector_quantize_rotation_backward" if estimator == "rotation" else "vector_quantize_backward"
    requires(backend, "vector_quantize", backward)
    x, codebook = randn(6, 3), randn(8, 3)
    codebook[5:] += 100.0  # far from every row: never chosen
    codebook.requires_grad_(True)
    _, indices, loss = fastvae.vector_quantize(x, codebook, estimator=estimator)
    (loss * INF).backward()
    assert not (indices >= 5).any()
    assert torch.equal(codebook.grad[5:], torch.zeros(3, 3))


def check_nearest_code_overflowing_expansion(d, device):
    """Points 1e17 apart around a centre 2e19 out: ||e||^2 and x.e overflow float32, the
    distances (~1e34) do not."""
    centre = 2e19 * torch.sign(randn(d))
    codebook, x = centre + randn(40, d, scale=1e17), centre + randn(30, d, scale=1e17)
    indices, sq_dist = fastvae.nearest_code(x.to(device), codebook.to(device))
    truth = ((x.double()[:, None] - codebook.double()[None]) ** 2).sum(-1)
    assert torch.equal(indices.cpu(), truth.argmin(1))
    assert_close(sq_dist.cpu(), truth.min(1).values, torch.float32, scale=10.0)


@pytest.mark.parametrize("d", [4, 16, 33])
def test_nearest_code_ranks_right_where_the_expansion_overflows(backend, d):
    requires(backend, "nearest_code")
    check_nearest_code_overflowing_expansion(d, "cpu")


# ---------------------------------------------------------------- CUDA: max/min drop NaN there
@pytest.mark.gpu
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_cuda_gumbel_softmax_nan_rows_and_extreme_tau(backend, hard):
    requires_on(backend, "cuda", *GUMBEL_OPS)
    for shape, dim in GUMBEL_CASES + [((6, 70000), -1)]:
        check_gumbel_nan_rows(shape, dim, hard, "cuda")
    for tau in (1e-45, 1e300):
        check_extreme_tau(tau, "cuda")


@pytest.mark.gpu
def test_cuda_categorical_kl_nonfinite(backend):
    requires_on(backend, "cuda", *KL_OPS)
    for k, dim in [(5, 1), (40, 1), (7, 0), (5000, 1)]:
        check_categorical_kl_nonfinite(k, dim, "cuda")


@pytest.mark.gpu
def test_cuda_nearest_code_nonfinite(backend):
    requires_on(backend, "cuda", *VQ_OPS)
    for k, d in [(9, 4), (9, 33), (300, 8), (5000, 64)]:
        check_nearest_code_nonfinite(k, d, "cuda")
    for d in (4, 16, 33):
        check_nearest_code_overflowing_expansion(d, "cuda")
