"""Gumbel column, Triton: gumbel_quantize, the Gumbel-Softmax sample over codes mixed with
the codebook, streamed as flash attention streams keys; the ``(N, K)`` sample is never written.

``logits`` are ``(N, K)`` contiguous rows, ``codebook`` ``(K, D)``. Each kernel walks the
codes in tiles of ``4 * BLOCK_Q`` columns whose Gumbel noise is made in registers from the
seed (kernels/gumbel.py's ``_perturbed_tile``: the stream of ``fastvae.reference``):

* forward (a program per ``BLOCK_R`` rows): online softmax, a running max ``m`` and sum
  ``l`` per row rescaling the ``(BLOCK_R, D)`` accumulator of ``e_tile @ codebook_tile``;
  also the running argmax (the indices). Saved per row: ``(m, log l)``. Hard: the code at
  the argmax is gathered instead of the products.
* backward, logits (a program per ``BLOCK_R`` rows): ``y = exp((z - m) / tau - log l)``
  rebuilt per tile, ``d_y = grad @ codebook_tile^T``; a first sweep takes ``s = sum(y d_y)``
  and writes ``d_y`` into grad_logits, a second turns it into ``y (d_y - s) / tau``; tau's
  gradient per program comes from the first sweep (``-(sum(y d_y t) - s sum(y t)) / tau``,
  ``t = (z - m) / tau``: a row's gradient sums to 0, so ``log l`` drops out).
* backward, codebook (a program per code tile, looping over all rows: deterministic, no
  atomics): ``sum over rows of w^T grad`` with ``w`` the forward's weights (``y``, or the
  one-hot rows of the hard sample).

``gumbel_quantize_kl`` (GumbelQuantizer's op: the sample and each row's KL to the uniform
prior) runs ``gumbel_quantize`` and kernels/gumbel.py's KL kernel one after the other (two
reads of the logits each way where the native kernel takes one; a fused kernel is untried).

Products run in float32 (``input_precision="ieee"``: the spec's precision; TF32 would be
faster on a GPU, untried). A row holding a NaN or ``+inf`` logit gives NaN, an all ``-inf``
row zeros, as the reference.
"""
import torch
import triton
import triton.language as tl

from .gumbel import _MIN_FLOAT, _categorical_kl_rows, _perturbed_tile

_BLOCK_R = 16  # rows per program (tl.dot needs at least 16)
_BLOCK_Q = 8  # quads per code tile: 32 codes


@triton.jit
def _inv_tau(tau_ptr):
    """1 / tau clamped to float32's normal range (reference.inverse_tau), read from memory."""
    return tl.minimum(tl.maximum(1.0 / tl.load(tau_ptr).to(tl.float32), 1.1754943508222875e-38),
                      3.4028234663852886e38)


@triton.jit
def _sample_tile(x_ptr, seed, rows, row_mask, col0, K, m, log_l, inv_tau, BLOCK_R: tl.constexpr,
                 BLOCK_Q: tl.constexpr):
    """(y, t = (z - m) / tau where y > 0 else 0, columns, mask) of a code tile, rebuilt from the row statistics."""
    z, cols, mask = _perturbed_tile(x_ptr, rows.to(tl.int64) * K, 1, seed, rows, row_mask, col0, K, BLOCK_R, BLOCK_Q)
    t = (z - m[:, None]) * inv_tau
    y = tl.where(mask & (log_l[:, None] > float("-inf")), tl.exp(t - log_l[:, None]), 0.0)
    return y, tl.where(y > 0, t, 0.0), cols, mask


@triton.jit
def _forward_kernel(x_ptr, cb_ptr, seed_ptr, tau_ptr, q_ptr, idx_ptr, stats_ptr, N, K, D,
                    HARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    inv_tau = _inv_tau(tau_ptr)
    seed = tl.load(seed_ptr)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    dims = tl.arange(0, BLOCK_D)
    m = tl.full((BLOCK_R,), _MIN_FLOAT, tl.float32)
    l = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    best_col = tl.zeros((BLOCK_R,), tl.int32)
    first_nan = tl.full((BLOCK_R,), 2147483647, tl.int32)
    first_inf = tl.full((BLOCK_R,), 2147483647, tl.int32)
    for col0 in range(0, K, 4 * BLOCK_Q):
        z, cols, mask = _perturbed_tile(x_ptr, rows.to(tl.int64) * K, 1, seed, rows, row_mask, col0, K,
                                        BLOCK_R, BLOCK_Q)
        first_nan = tl.minimum(first_nan, tl.min(tl.where(z != z, cols[None, :], 2147483647), axis=1))
        first_inf = tl.minimum(first_inf, tl.min(tl.where(z == float("inf"), cols[None, :], 2147483647), axis=1))
        z = tl.where(z != z, float("-inf"), z)  # kept out of max and argmax (the NaN rows are set below)
        tile_best = tl.max(z, axis=1)
        tile_col = tl.argmax(z, axis=1, tie_break_left=True).to(tl.int32) + col0
        better = tile_best > best
        best_col = tl.where(better, tile_col, best_col)
        best = tl.where(better, tile_best, best)
        m_new = tl.maximum(m, tile_best)
        if not HARD:
            alpha = tl.exp((m - m_new) * inv_tau)
            e = tl.exp((z - m_new[:, None]) * inv_tau)
            codes = tl.load(cb_ptr + cols[:, None].to(tl.int64) * D + dims[None, :],
                            mask=(cols[:, None] < K) & (dims[None, :] < D), other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(e, codes, input_precision="ieee")
            l = l * alpha + tl.sum(e, axis=1)
        else:
            l = l * tl.exp((m - m_new) * inv_tau) + tl.sum(tl.exp((z - m_new[:, None]) * inv_tau), axis=1)
        m = m_new
    bad = (first_nan < 2147483647) | (first_inf < 2147483647)  # a NaN or +inf logit
    index = tl.where(first_nan < 2147483647, first_nan, tl.where(first_inf < 2147483647, first_inf, best_col))
    empty = l == 0  # all -inf: nothing to sample
    out_mask = row_mask[:, None] & (dims[None, :] < D)
    if HARD:
        q = tl.load(cb_ptr + index[:, None].to(tl.int64) * D + dims[None, :], mask=out_mask, other=0.0).to(tl.float32)
    else:
        q = acc / tl.where(empty, 1.0, l)[:, None]
    q = tl.where(bad[:, None], float("nan"), tl.where(empty[:, None], 0.0, q))
    tl.store(q_ptr + rows[:, None].to(tl.int64) * D + dims[None, :], q.to(q_ptr.dtype.element_ty), mask=out_mask)
    tl.store(idx_ptr + rows, index.to(tl.int64), mask=row_mask)
    m = tl.where(bad, float("nan"), tl.where(empty, float("-inf"), m))
    log_l = tl.where(bad, float("nan"), tl.where(empty, float("-inf"), tl.log(tl.where(empty, 1.0, l))))
    tl.store(stats_ptr + 2 * rows.to(tl.int64), m, mask=row_mask)
    tl.store(stats_ptr + 2 * rows.to(tl.int64) + 1, log_l, mask=row_mask)


@triton.jit
def _logits_grad_kernel(x_ptr, cb_ptr, seed_ptr, tau_ptr, stats_ptr, g_ptr, gx_ptr, tau_part_ptr, N, K, D,
                        BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, CHUNK_D: tl.constexpr):
    inv_tau = _inv_tau(tau_ptr)
    seed = tl.load(seed_ptr)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    dims = tl.arange(0, CHUNK_D)
    m = tl.load(stats_ptr + 2 * rows.to(tl.int64), mask=row_mask, other=float("-inf"))
    log_l = tl.load(stats_ptr + 2 * rows.to(tl.int64) + 1, mask=row_mask, other=float("-inf"))
    s = tl.zeros((BLOCK_R,), tl.float32)
    dot_t = tl.zeros((BLOCK_R,), tl.float32)
    y_t = tl.zeros((BLOCK_R,), tl.float32)
    for col0 in range(0, K, 4 * BLOCK_Q):  # s = sum(y d_y); d_y parked in grad_logits
        y, t, cols, mask = _sample_tile(x_ptr, seed, rows, row_mask, col0, K, m, log_l, inv_tau, BLOCK_R, BLOCK_Q)
        # d_y over CHUNK_D features at a time (re-read from cache): whole (BLOCK_R, D) and
        # (D, tile) operands held across the sweep spilled registers at D = 256 (sm_90)
        d_y = tl.zeros((BLOCK_R, 4 * BLOCK_Q), tl.float32)
        for d0 in range(0, D, CHUNK_D):
            g = tl.load(g_ptr + rows[:, None].to(tl.int64) * D + d0 + dims[None, :],
                        mask=row_mask[:, None] & (d0 + dims[None, :] < D), other=0.0).to(tl.float32)
            codes = tl.load(cb_ptr + cols[None, :].to(tl.int64) * D + d0 + dims[:, None],
                            mask=(cols[None, :] < K) & (d0 + dims[:, None] < D), other=0.0).to(tl.float32)
            d_y = tl.dot(g, codes, d_y, input_precision="ieee")
        s += tl.sum(y * d_y, axis=1)
        dot_t += tl.sum(y * d_y * t, axis=1)
        y_t += tl.sum(y * t, axis=1)
        tl.store(gx_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], d_y, mask=mask)
    nan_row = m != m
    for col0 in range(0, K, 4 * BLOCK_Q):
        y, t, cols, mask = _sample_tile(x_ptr, seed, rows, row_mask, col0, K, m, log_l, inv_tau, BLOCK_R, BLOCK_Q)
        offsets = gx_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
        d_y = tl.load(offsets, mask=mask, other=0.0)
        grad = tl.where(nan_row[:, None], float("nan"), y * (d_y - s[:, None]) * inv_tau)
        tl.store(offsets, grad, mask=mask)
    tau_term = tl.where(row_mask, -(dot_t - s * y_t) * inv_tau, 0.0)
    tl.store(tau_part_ptr + tl.program_id(0), tl.sum(tl.where(nan_row, float("nan"), tau_term), axis=0))


@triton.jit
def _codebook_grad_kernel(x_ptr, seed_ptr, tau_ptr, stats_ptr, idx_ptr, g_ptr, gcb_ptr, N, K, D,
                          HARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    inv_tau = _inv_tau(tau_ptr)
    seed = tl.load(seed_ptr)
    col0 = tl.program_id(0) * 4 * BLOCK_Q
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros((4 * BLOCK_Q, BLOCK_D), tl.float32)
    for row0 in range(0, N, BLOCK_R):
        rows = row0 + tl.arange(0, BLOCK_R)
        row_mask = rows < N
        m = tl.load(stats_ptr + 2 * rows.to(tl.int64), mask=row_mask, other=float("-inf"))
        log_l = tl.load(stats_ptr + 2 * rows.to(tl.int64) + 1, mask=row_mask, other=float("-inf"))
        if HARD:
            cols = col0 + tl.arange(0, 4 * BLOCK_Q)
            index = tl.load(idx_ptr + rows, mask=row_mask, other=-1)
            w = tl.where((cols[None, :] == index[:, None]) & (log_l[:, None] > float("-inf")), 1.0, 0.0)
            w = tl.where((m != m)[:, None], float("nan"), w)
        else:
            w, _, cols, mask = _sample_tile(x_ptr, seed, rows, row_mask, col0, K, m, log_l, inv_tau, BLOCK_R,
                                            BLOCK_Q)
            w = tl.where((m != m)[:, None] & mask, float("nan"), w)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * D + dims[None, :],
                    mask=row_mask[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(w), g, input_precision="ieee")
    cols = col0 + tl.arange(0, 4 * BLOCK_Q)
    tl.store(gcb_ptr + cols[:, None].to(tl.int64) * D + dims[None, :], acc.to(gcb_ptr.dtype.element_ty),
             mask=(cols[:, None] < K) & (dims[None, :] < D))


def _block_d(d):
    return max(16, triton.next_power_of_2(d))


def gumbel_quantize(logits, codebook, seed, tau, hard):
    n, k = logits.shape
    d = codebook.shape[1]
    logits, codebook = logits.contiguous(), codebook.contiguous()
    quantized = torch.empty(n, d, device=logits.device, dtype=logits.dtype)
    indices = torch.empty(n, device=logits.device, dtype=torch.int64)
    stats = torch.empty(n, 2, device=logits.device, dtype=torch.float32)
    if n:
        _forward_kernel[(triton.cdiv(n, _BLOCK_R),)](logits, codebook, seed, tau, quantized, indices, stats, n, k, d,
                                                    HARD=bool(hard), BLOCK_R=_BLOCK_R, BLOCK_Q=_BLOCK_Q,
                                                    BLOCK_D=_block_d(d))
    return quantized, indices, stats


def gumbel_quantize_backward(grad_quantized, logits, codebook, seed, tau, stats, indices):
    n, k = logits.shape
    d = codebook.shape[1]
    logits, codebook = logits.contiguous(), codebook.contiguous()
    grad = grad_quantized.contiguous()
    grad_logits = torch.empty(n, k, device=logits.device, dtype=torch.float32)
    grad_codebook = torch.empty(k, d, device=logits.device, dtype=torch.float32)
    row_blocks = triton.cdiv(n, _BLOCK_R)
    tau_parts = torch.zeros(max(row_blocks, 1), device=logits.device, dtype=torch.float32)
    if n:
        _logits_grad_kernel[(row_blocks,)](logits, codebook, seed, tau, stats, grad, grad_logits, tau_parts, n, k, d,
                                           BLOCK_R=_BLOCK_R, BLOCK_Q=_BLOCK_Q, CHUNK_D=min(_block_d(d), 32))
    _codebook_grad_kernel[(triton.cdiv(k, 4 * _BLOCK_Q),)](
        logits, seed, tau, stats, indices if indices is not None else stats, grad, grad_codebook, n, k, d,
        HARD=indices is not None, BLOCK_R=_BLOCK_R, BLOCK_Q=_BLOCK_Q, BLOCK_D=_block_d(d))
    grad_tau = tau_parts.sum(dtype=torch.float64).reshape(tau.shape).to(tau.dtype)
    return [grad_logits.to(logits.dtype), grad_codebook.to(codebook.dtype), grad_tau]


def gumbel_quantize_kl(logits, codebook, seed, tau, hard):
    quantized, indices, stats = gumbel_quantize(logits, codebook, seed, tau, hard)
    kl = _categorical_kl_rows(logits, None, 1)
    lse = torch.logsumexp(logits.to(torch.float32), dim=1, keepdim=True)
    return quantized, indices, torch.cat([stats, lse], dim=1), kl


def gumbel_quantize_kl_backward(grad_quantized, grad_kl, logits, codebook, seed, tau, stats, kl, indices):
    grads = gumbel_quantize_backward(grad_quantized, logits, codebook, seed, tau, stats[:, :2].contiguous(), indices)
    row_grad = grad_kl.to(torch.float32).expand(logits.shape[:1]).contiguous()
    grads[0] = grads[0] + _categorical_kl_rows(logits, None, 1, row_grad)[0]
    return grads
