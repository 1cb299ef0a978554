"""Pure-PyTorch implementation of every fastvae op: the ``torch`` backend and the spec.

Each function here is the backend interface for one op: a backend joins fastvae by
providing functions with these names and signatures (see ``fastvae._backend``). Inputs
arrive validated by ``fastvae.ops``; shapes are already normalised (``x`` of the VQ ops
is ``(N, D)``, ``seed`` is an int64 tensor of one element).

Arithmetic is float32 for float16/bfloat16/float32 inputs and float64 for float64
inputs, so the tests can evaluate this module in float64 as ground truth.

Random streams (shared bit for bit by every backend, so a seed gives the same sample
everywhere): Philox-4x32-10 keyed by the 64-bit seed, ``key = (seed & 0xffffffff,
seed >> 32)``. A 32-bit draw ``r`` becomes the uniform ``u = ((r >> 9) + 0.5) * 2**-23``,
which lies in ``[2**-24, 1 - 2**-24]`` and is exact in float32, so ``log(u)`` and
``log(-log(u))`` are always finite.

* Gaussian ops: element ``i`` of the row-major flattened tensor takes lane ``i % 4`` of
  ``philox(counter=(g & 0xffffffff, g >> 32, 0, 0))`` with ``g = i // 4``; lanes
  ``(0, 1)`` and ``(2, 3)`` are Box-Muller pairs: ``n0 = r cos(2 pi u1)``,
  ``n1 = r sin(2 pi u1)``, ``r = sqrt(-2 log u0)`` (likewise ``n2, n3`` from ``u2, u3``).
* Gumbel ops: with ``dim`` moved last and the rest flattened to rows, element
  ``(row, c)`` takes lane ``c % 4`` of ``philox(counter=(c // 4, row & 0xffffffff,
  row >> 32, 0))`` and the noise is ``-log(-log(u))``.
"""
import math

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_TWO_PI = 2.0 * math.pi


def compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- random streams
def _mulhilo(const, x):
    """(hi, lo) 32-bit halves of const * x for uint32 values held in int64 tensors."""
    c_hi, c_lo = const >> 16, const & 0xFFFF
    p_lo = x * c_lo  # < 2**48: no int64 overflow
    p_hi = x * c_hi
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32(seed, c0, c1, c2, c3, rounds=10):
    """Philox-4x32 on int64 tensors holding uint32 counters; returns four such tensors.
    ``seed``: the 64-bit key, an int or an int64 tensor (two's complement)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND_A, c0)
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint_to_uniform(r, dtype=torch.float32):
    """uint32 draws (in int64) -> uniforms in [2**-24, 1 - 2**-24], exact in float32."""
    return ((r >> 9).to(dtype) + 0.5) * 2.0**-23


def _seed_key(seed):
    """The seed as the 0-d int64 tensor ``philox4x32`` keys with: kept a tensor (not a
    Python int) so the streams also run under ``torch.func.vmap`` with a seed per sample."""
    return seed.reshape(-1)[0]


def normal_stream(seed, shape, device, dtype=torch.float32):
    """The standard-normal noise the Gaussian ops use for ``seed`` and ``shape``."""
    n = math.prod(shape)
    groups = torch.arange((n + 3) // 4, device=device, dtype=torch.int64)
    zero = torch.zeros_like(groups)
    r = philox4x32(_seed_key(seed), groups & _MASK32, groups >> 32, zero, zero)
    u0, u1, u2, u3 = (uint_to_uniform(x, dtype) for x in r)
    rad01, rad23 = torch.sqrt(-2.0 * torch.log(u0)), torch.sqrt(-2.0 * torch.log(u2))
    th01, th23 = _TWO_PI * u1, _TWO_PI * u3
    lanes = (rad01 * torch.cos(th01), rad01 * torch.sin(th01), rad23 * torch.cos(th23), rad23 * torch.sin(th23))
    return torch.stack(lanes, dim=-1).reshape(-1)[:n].reshape(shape)


def gumbel_stream(seed, rows, cols, device, dtype=torch.float32):
    """The ``(rows, cols)`` Gumbel(0, 1) noise the Gumbel ops use for ``seed``."""
    row = torch.arange(rows, device=device, dtype=torch.int64)[:, None]
    col = torch.arange(cols, device=device, dtype=torch.int64)[None, :]
    lanes = philox4x32(_seed_key(seed), (col >> 2) + 0 * row, (row & _MASK32) + 0 * col, (row >> 32) + 0 * col,
                       torch.zeros(rows, cols, device=device, dtype=torch.int64))
    lane = (col & 3).expand(rows, cols)
    r = torch.where(lane == 0, lanes[0], torch.where(lane == 1, lanes[1], torch.where(lane == 2, lanes[2], lanes[3])))
    return -torch.log(-torch.log(uint_to_uniform(r, dtype)))


# ---------------------------------------------------------------- Gaussian column
def _reduce(value, reduction, batch):
    if reduction == "none":
        return value
    # Accumulated in float64, so the float32 result does not depend on how the sum is split
    # across threads.
    if reduction == "per_sample":  # the sum over every dimension but the first
        return value.reshape(value.shape[0], math.prod(value.shape[1:])).sum(dim=1, dtype=torch.float64)
    total = value.sum(dtype=torch.float64)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(value.numel(), 1)
    return total / batch  # batchmean


def _reduction_scale(reduction, numel, batch):
    # An empty batch (batch == 0) has a NaN batchmean (0 / 0) and no elements to scale.
    return {"sum": 1.0, "mean": 1.0 / max(numel, 1), "batchmean": 1.0 / batch if batch else math.nan}[reduction]


def reparameterize(mu, logvar, seed):
    ct = compute_dtype(mu)
    eps = normal_stream(seed, mu.shape, mu.device, ct)
    return (mu.to(ct) + torch.exp(0.5 * logvar.to(ct)) * eps).to(mu.dtype).contiguous()


def reparameterize_backward(grad_z, mu, logvar, z, seed, dense_grad_mu):
    """``[grad_logvar]``, the logvar gradient ``grad_z * std * eps / 2``; with
    ``dense_grad_mu``, ``[grad_mu, grad_logvar]`` where ``grad_mu`` is ``grad_z`` itself
    as a new contiguous tensor (a backend writes it in the same pass).

    ``mu`` and ``z`` (the forward's sample) let a backend recover ``std * eps`` as
    ``z - mu`` where that is exact enough instead of regenerating eps (the native CPU
    kernel does); the spec regenerates eps from the seed.
    """
    ct = compute_dtype(logvar)
    std = torch.exp(0.5 * logvar.to(ct))
    grad_logvar = grad_z.to(ct) * 0.5 * std * normal_stream(seed, logvar.shape, logvar.device, ct)
    grads = [grad_logvar.to(logvar.dtype).contiguous()]
    return [grad_z.clone(memory_format=torch.contiguous_format)] + grads if dense_grad_mu else grads


def _gaussian_kl_elementwise(mu, logvar, prior_mu, prior_logvar):
    if prior_mu is None and prior_logvar is None:
        return 0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar)
    diff = mu if prior_mu is None else mu - prior_mu
    if prior_logvar is None:
        return 0.5 * (torch.exp(logvar) + diff * diff - 1.0 - logvar)
    return 0.5 * (prior_logvar - logvar + (torch.exp(logvar) + diff * diff) * torch.exp(-prior_logvar) - 1.0)


def gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction):
    ct = compute_dtype(mu)
    prior = [None if p is None else p.to(ct) for p in (prior_mu, prior_logvar)]
    kl = _gaussian_kl_elementwise(mu.to(ct), logvar.to(ct), *prior)
    kl = kl.expand(mu.shape) if reduction in ("none", "per_sample") else kl
    return _reduce(kl, reduction, mu.shape[0] if mu.dim() else 1).to(mu.dtype).contiguous()


def gaussian_kl_backward(grad, mu, logvar, prior_mu, prior_logvar, reduction):
    """Gradients for (mu, logvar[, prior_mu, prior_logvar]), the prior ones at mu's shape."""
    ct = compute_dtype(mu)
    m, lv = mu.to(ct), logvar.to(ct)
    g = grad.to(ct)
    if reduction == "per_sample":  # one gradient per sample, shared by its elements
        g = g.reshape((-1,) + (1,) * (mu.dim() - 1))
    elif reduction != "none":
        g = g * _reduction_scale(reduction, mu.numel(), mu.shape[0] if mu.dim() else 1)
    diff = m if prior_mu is None else m - prior_mu.to(ct)
    inv_prior_var = 1.0 if prior_logvar is None else torch.exp(-prior_logvar.to(ct))
    g_mu = g * diff * inv_prior_var
    g_lv = g * 0.5 * (torch.exp(lv) * inv_prior_var - 1.0)
    grads = [g_mu.expand(mu.shape), g_lv.expand(mu.shape)]
    if prior_mu is not None or prior_logvar is not None:
        g_pl = -g_lv - 0.5 * diff * g_mu
        grads += [(-g_mu).expand(mu.shape), g_pl.expand(mu.shape)]
    return [x.to(mu.dtype).contiguous() for x in grads]


def reparameterize_kl(mu, logvar, seed, reduction):
    return reparameterize(mu, logvar, seed), gaussian_kl(mu, logvar, None, None, reduction)


def reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, z, seed, reduction):
    g_mu, g_lv = gaussian_kl_backward(grad_kl, mu, logvar, None, None, reduction)
    (g_lv_z,) = reparameterize_backward(grad_z, mu, logvar, z, seed, False)
    ct = compute_dtype(mu)
    return [(grad_z.to(ct) + g_mu.to(ct)).to(mu.dtype).contiguous(), (g_lv_z.to(ct) + g_lv.to(ct)).to(mu.dtype).contiguous()]


# ---------------------------------------------------------------- Gumbel column
def _rows(t, dim):
    """View ``t`` with ``dim`` moved last, as (rows, K); and a function undoing it."""
    moved = t.movedim(dim, -1)
    shape = moved.shape
    return moved.reshape(-1, shape[-1]), lambda y: y.reshape(shape).movedim(-1, dim).contiguous()


def inverse_tau(tau, dtype):
    """``1 / tau`` (a number or a one-element tensor) clamped to ``dtype``'s normal range, so
    every ``tau > 0`` computes: below ``1 / max`` the sample is the one-hot of the argmax,
    above ``1 / tiny`` it is uniform over the unmasked classes (``-inf * tiny`` stays ``-inf``)."""
    finfo = torch.finfo(dtype)
    tau = tau.to(dtype) if isinstance(tau, torch.Tensor) else torch.tensor(tau, dtype=dtype)
    return (1.0 / tau).clamp(finfo.tiny, finfo.max)


def _gumbel_soft(logits2d, seed, tau):
    """(soft sample, perturbed logits ``z = logits + g``) of (rows, K) logits.

    ``softmax(z / tau)`` is computed as ``softmax((z - max z) * inverse_tau)``: ``z - max z``
    is at most 0, so no ``tau`` overflows it. A row holding a NaN or ``+inf`` logit gives
    NaN (as :func:`torch.softmax`); an all ``-inf`` row has nothing to sample and gives zeros.
    """
    ct = compute_dtype(logits2d)
    perturbed = logits2d.to(ct) + gumbel_stream(seed, logits2d.shape[0], logits2d.shape[1], logits2d.device, ct)
    top = perturbed.amax(dim=-1, keepdim=True)  # NaN when the row holds one
    y = torch.softmax((perturbed - top) * inverse_tau(tau, ct), dim=-1)
    return torch.where(top == -math.inf, 0.0, y), perturbed


def gumbel_softmax(logits, seed, tau, hard, dim):
    logits2d, restore = _rows(logits, dim)
    y, perturbed = _gumbel_soft(logits2d, seed, tau)
    if hard:
        # The argmax of logits + g (tau > 0 does not change it), ties to the lowest index;
        # the row's soft sum is 1, or 0 (all -inf: zeros), or NaN (NaN or +inf: NaN).
        one_hot = torch.zeros_like(y).scatter_(-1, perturbed.argmax(dim=-1, keepdim=True), 1.0)
        soft_sum = y.sum(dim=-1, keepdim=True)
        y = torch.where(soft_sum > 0, one_hot, soft_sum)
    return restore(y.to(logits.dtype))


def gumbel_softmax_backward(grad_y, logits, seed, tau, dim):
    """Gradient of the soft sample (also the straight-through gradient of the hard one)."""
    logits2d, restore = _rows(logits, dim)
    g2d, _ = _rows(grad_y, dim)
    y, _ = _gumbel_soft(logits2d, seed, tau)
    g = g2d.to(y.dtype)
    grad = y * (g - (g * y).sum(dim=-1, keepdim=True)) * inverse_tau(tau, y.dtype)
    return restore(grad.to(logits.dtype))


def gumbel_softmax_backward_from_sample(grad_y, y, tau, dim):
    """Gradient of the soft sample from the sample ``y`` itself (a softmax backward: no
    noise, no exp). An all -inf row has y = 0, so its gradient is 0."""
    y2d, restore = _rows(y, dim)
    g2d, _ = _rows(grad_y, dim)
    ct = compute_dtype(y)
    y2d, g = y2d.to(ct), g2d.to(ct)
    grad = y2d * (g - (g * y2d).sum(dim=-1, keepdim=True)) * inverse_tau(tau, ct)
    return restore(grad.to(y.dtype))


def _has_nan_or_posinf(rows2d):
    return (~(rows2d < math.inf)).any(dim=-1)


def _log_softmax_or_masked(rows2d):
    """log_softmax of each row, -inf for an all -inf row (which log_softmax makes NaN)."""
    log_p = torch.log_softmax(rows2d, dim=-1)
    return torch.where(rows2d.amax(dim=-1, keepdim=True) == -math.inf, -math.inf, log_p)


def _categorical_terms(logits2d, prior2d):
    """(p, log q, KL per row). Masked (-inf) logits have p = 0 and contribute 0, whatever q
    is; mass where the prior has none (q = 0, including an all -inf prior row) gives +inf;
    an all -inf row of logits is no distribution (p = 0, KL 0, gradient 0); a row whose
    logits or prior hold a NaN or +inf gives NaN."""
    ct = compute_dtype(logits2d)
    log_p = _log_softmax_or_masked(logits2d.to(ct))
    p = log_p.exp()
    invalid = _has_nan_or_posinf(logits2d)
    if prior2d is None:
        log_q = torch.full_like(log_p, -math.log(logits2d.shape[-1]))
    else:
        log_q = _log_softmax_or_masked(prior2d.to(ct))
        invalid |= _has_nan_or_posinf(prior2d)
    # Classes with p = 0 (masked logits) contribute 0, whatever q is. The inner where keeps
    # their -inf log p out of the product, whose derivative (a double backward) would be NaN.
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    pointwise = torch.where(p > 0, p * log_ratio, torch.zeros_like(p))
    return p, log_q, torch.where(invalid, math.nan, pointwise.sum(dim=-1))


def categorical_kl(logits, prior_logits, dim, reduction):
    logits2d, _ = _rows(logits, dim)
    prior2d = None if prior_logits is None else _rows(prior_logits.expand(logits.shape), dim)[0]
    _, _, kl = _categorical_terms(logits2d, prior2d)
    moved_shape = logits.movedim(dim, -1).shape[:-1]
    kl = kl.reshape(moved_shape)
    return _reduce(kl, reduction, logits.shape[0] if logits.dim() > 1 else 1).to(logits.dtype)


def categorical_kl_backward(grad, logits, prior_logits, dim, reduction):
    """Gradients for logits[, prior_logits], the prior one at the logits' shape."""
    logits2d, restore = _rows(logits, dim)
    prior2d = None if prior_logits is None else _rows(prior_logits.expand(logits.shape), dim)[0]
    p, log_q, kl = _categorical_terms(logits2d, prior2d)
    n_dist = logits2d.shape[0]
    if reduction == "none":
        g = grad.to(p.dtype).reshape(n_dist, 1)
    else:
        g = grad.to(p.dtype) * _reduction_scale(reduction, n_dist, logits.shape[0] if logits.dim() > 1 else 1)
    log_p = torch.log_softmax(logits2d.to(p.dtype), dim=-1)
    pointwise = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    grads = [restore((g * p * (pointwise - kl[:, None])).to(logits.dtype))]
    if prior_logits is not None:
        # d/d prior of -sum p log q is q sum(p) - p: 0 for a row with no mass (all -inf)
        grads.append(restore((g * (log_q.exp() * p.sum(-1, keepdim=True) - p)).to(logits.dtype)))
    return grads


# The VQ column's specs, the fused Gumbel-quantize op's and the tokenizer ops' (residual VQ,
# segment sums) have modules of their own (they import the helpers above).
from ._reference_vq import (nearest_code, vector_quantize, vector_quantize_backward,  # noqa: E402,F401
                            vector_quantize_rotation_backward)
from ._reference_gumbel_quantize import (gumbel_quantize, gumbel_quantize_backward, gumbel_quantize_kl,  # noqa: E402,F401
                                         gumbel_quantize_kl_backward)
from ._reference_tokenizer import (residual_quantize, residual_quantize_backward,  # noqa: E402,F401
                                   residual_segment_sums, segment_mean)
