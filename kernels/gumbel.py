"""Gumbel column, Triton: gumbel_softmax (soft and hard), its backward (from the seed, or
from the soft sample), categorical_kl.

Every tensor is addressed as ``(outer, K, inner)`` around ``dim`` through its strides, so
``dim=1`` of a ``(B, K, H, W)`` tensor (or a non-contiguous view) needs no transposed
copy: row ``r`` of the ``(rows, K)`` view with ``dim`` moved last is ``(r // inner,
r % inner)``. A program takes ``BLOCK_R`` rows and walks the columns in tiles of
``4 * BLOCK_Q``; the Gumbel noise of a tile is made in registers from the seed (Philox
quad ``c // 4`` of the row, lane ``c % 4``, as ``fastvae.reference``) and never stored.
A row that fits one tile is done in one read; wider rows use an online softmax (running
max and sum) and a second sweep that regenerates the noise rather than storing it.
Backward from the sample (the soft sample y is the saved output) is a softmax backward
over y and the output gradient, no noise and no exp: one read when the row fits a tile,
else a sweep for sum(grad * y) and a second one writing y * (grad - sum) / tau.

Non-finite values are handled explicitly, never through max/min (a GPU's max.f32 drops a
NaN that the interpreter propagates): a row of logits (or of the prior) holding a NaN or
+inf is written all NaN (KL: NaN), as torch.softmax gives. ``z = logits + g`` is centred
on the row max before it is scaled by ``1 / tau`` (clamped to float32's normal range), so
every ``tau > 0`` computes.
"""
import math

import torch
import triton
import triton.language as tl

from ._rng import gumbel4

# Globals a kernel reads must be constexpr (compiled Triton refuses plain Python globals).
_SOFT, _HARD, _BACKWARD, _FROM_SAMPLE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
# Running-max start: finite, so exp(m - m_new) never meets inf - inf.
_MIN_FLOAT = tl.constexpr(-3.4028234663852886e38)
_TILE_ELEMENTS = 8192  # elements of one (rows x columns) tile per program


# ---------------------------------------------------------------- shared pieces
@triton.jit
def _row_starts(rows, inner, outer_stride, inner_stride):
    rows = rows.to(tl.int64)
    return rows // inner * outer_stride + rows % inner * inner_stride


@triton.jit
def _inverse_or_zero(s):
    """1 / s where s > 0, else 0 (the sum of an all -inf row)."""
    has_mass = s > 0
    return tl.where(has_mass, 1.0 / tl.where(has_mass, s, 1.0), 0.0)


@triton.jit
def _nan_or_posinf(v):
    """Per row of a tile: whether a value is NaN or +inf."""
    return tl.max(((v != v) | (v == float("inf"))).to(tl.int32), axis=1) > 0


@triton.jit
def _perturbed_tile(x_ptr, x_rows, x_cs, seed, rows, row_mask, col0, K,
                    BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    """(logits + g, columns, mask) of the tile of columns col0 .. col0 + 4 * BLOCK_Q."""
    quads = col0 // 4 + tl.arange(0, BLOCK_Q)
    g0, g1, g2, g3 = gumbel4(seed, rows[:, None], quads[None, :])
    # join(join(g0, g2), join(g1, g3)) puts lane k of quad q at position 4q + k.
    noise = tl.reshape(tl.join(tl.join(g0, g2), tl.join(g1, g3)), (BLOCK_R, 4 * BLOCK_Q))
    cols = col0 + tl.arange(0, 4 * BLOCK_Q)
    mask = row_mask[:, None] & (cols[None, :] < K)
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :].to(tl.int64) * x_cs, mask=mask, other=float("-inf"))
    return x.to(tl.float32) + noise, cols, mask


@triton.jit
def _grad_tile(grad_ptr, g_rows, g_cs, cols, mask):
    """The output gradient of a tile as float32, 0 outside."""
    g = tl.load(grad_ptr + g_rows[:, None] + cols[None, :].to(tl.int64) * g_cs, mask=mask, other=0.0)
    return g.to(tl.float32)


@triton.jit
def _sample_tile(y_ptr, y_rows, y_cs, row_mask, col0, K, BLOCK_C: tl.constexpr):
    """(y, columns, mask) of the tile of columns col0 .. col0 + BLOCK_C of the soft sample, 0 outside."""
    cols = col0 + tl.arange(0, BLOCK_C)
    mask = row_mask[:, None] & (cols[None, :] < K)
    y = tl.load(y_ptr + y_rows[:, None] + cols[None, :].to(tl.int64) * y_cs, mask=mask, other=0.0)
    return y.to(tl.float32), cols, mask


@triton.jit
def _gumbel_kernel(x_ptr, grad_ptr, out_ptr, seed_ptr, n_rows, K, inner, out_os, x_os, x_is, x_cs, g_os, g_is, g_cs,
                   tau_ptr,
                   MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, SINGLE_TILE: tl.constexpr):
    # From memory: a learned tau needs no host sync. Clamped to float32's normal range, as
    # reference.inverse_tau: every tau > 0 computes.
    inv_tau = tl.minimum(tl.maximum(1.0 / tl.load(tau_ptr).to(tl.float32), 1.1754943508222875e-38),
                         3.4028234663852886e38)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    # x is the soft sample y in _FROM_SAMPLE mode, which has no noise and so no seed to read.
    seed = 0 if MODE == _FROM_SAMPLE else tl.load(seed_ptr)
    x_rows = _row_starts(rows, inner, x_os, x_is)
    g_rows = _row_starts(rows, inner, g_os, g_is)
    out_rows = _row_starts(rows, inner, out_os, 1)  # the output is contiguous: column stride `inner`
    if MODE == _FROM_SAMPLE:
        if SINGLE_TILE:
            y, cols, mask = _sample_tile(x_ptr, x_rows, x_cs, row_mask, 0, K, 4 * BLOCK_Q)
            g = _grad_tile(grad_ptr, g_rows, g_cs, cols, mask)
            tl.store(out_ptr + out_rows[:, None] + cols[None, :].to(tl.int64) * inner,
                     (y * (g - tl.sum(g * y, axis=1)[:, None]) * inv_tau).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            dot = tl.zeros((BLOCK_R,), tl.float32)  # sum(grad * y) of each row
            for col0 in range(0, K, 4 * BLOCK_Q):
                y, cols, mask = _sample_tile(x_ptr, x_rows, x_cs, row_mask, col0, K, 4 * BLOCK_Q)
                dot += tl.sum(_grad_tile(grad_ptr, g_rows, g_cs, cols, mask) * y, axis=1)
            for col0 in range(0, K, 4 * BLOCK_Q):
                y, cols, mask = _sample_tile(x_ptr, x_rows, x_cs, row_mask, col0, K, 4 * BLOCK_Q)
                g = _grad_tile(grad_ptr, g_rows, g_cs, cols, mask)
                tl.store(out_ptr + out_rows[:, None] + cols[None, :].to(tl.int64) * inner,
                         (y * (g - dot[:, None]) * inv_tau).to(out_ptr.dtype.element_ty), mask=mask)
    elif SINGLE_TILE:
        z, cols, mask = _perturbed_tile(x_ptr, x_rows, x_cs, seed, rows, row_mask, 0, K, BLOCK_R, BLOCK_Q)
        if MODE == _HARD:
            hit = cols[None, :] == tl.argmax(z, axis=1, tie_break_left=True)[:, None]
            y = (hit & (tl.max(z, axis=1) > float("-inf"))[:, None]).to(tl.float32)
        else:
            m = tl.maximum(tl.max(z, axis=1), _MIN_FLOAT)
            e = tl.exp((z - m[:, None]) * inv_tau)
            s = tl.sum(e, axis=1)
            y = e * _inverse_or_zero(s)[:, None]  # an all -inf row gives zeros
            if MODE == _BACKWARD:
                g = _grad_tile(grad_ptr, g_rows, g_cs, cols, mask)
                y = y * (g - tl.sum(g * y, axis=1)[:, None]) * inv_tau
        y = tl.where(_nan_or_posinf(z)[:, None], float("nan"), y)
        tl.store(out_ptr + out_rows[:, None] + cols[None, :].to(tl.int64) * inner,
                 y.to(out_ptr.dtype.element_ty), mask=mask)
    elif MODE == _HARD:
        best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        best_col = tl.zeros((BLOCK_R,), tl.int32)
        nan_row = tl.zeros((BLOCK_R,), tl.int1)
        for col0 in range(0, K, 4 * BLOCK_Q):
            z, cols, mask = _perturbed_tile(x_ptr, x_rows, x_cs, seed, rows, row_mask, col0, K, BLOCK_R, BLOCK_Q)
            nan_row = nan_row | _nan_or_posinf(z)
            tile_best = tl.max(z, axis=1)
            better = tile_best > best  # strict: ties keep the earlier tile's (lower) column
            best_col = tl.where(better, tl.argmax(z, axis=1, tie_break_left=True) + col0, best_col)
            best = tl.maximum(best, tile_best)
        for col0 in range(0, K, 4 * BLOCK_Q):
            cols = col0 + tl.arange(0, 4 * BLOCK_Q)
            mask = row_mask[:, None] & (cols[None, :] < K)
            y = ((cols[None, :] == best_col[:, None]) & (best > float("-inf"))[:, None]).to(tl.float32)
            y = tl.where(nan_row[:, None], float("nan"), y)
            tl.store(out_ptr + out_rows[:, None] + cols[None, :].to(tl.int64) * inner,
                     y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full((BLOCK_R,), _MIN_FLOAT, tl.float32)
        s = tl.zeros((BLOCK_R,), tl.float32)
        t = tl.zeros((BLOCK_R,), tl.float32)  # sum of grad * exp((z - m) / tau), for backward
        nan_row = tl.zeros((BLOCK_R,), tl.int1)
        for col0 in range(0, K, 4 * BLOCK_Q):
            z, cols, mask = _perturbed_tile(x_ptr, x_rows, x_cs, seed, rows, row_mask, col0, K, BLOCK_R, BLOCK_Q)
            nan_row = nan_row | _nan_or_posinf(z)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            rescale = tl.exp((m - m_new) * inv_tau)
            e = tl.exp((z - m_new[:, None]) * inv_tau)
            s = s * rescale + tl.sum(e, axis=1)
            if MODE == _BACKWARD:
                t = t * rescale + tl.sum(_grad_tile(grad_ptr, g_rows, g_cs, cols, mask) * e, axis=1)
            m = m_new
        inv_s = _inverse_or_zero(s)
        dot = t * inv_s
        for col0 in range(0, K, 4 * BLOCK_Q):
            z, cols, mask = _perturbed_tile(x_ptr, x_rows, x_cs, seed, rows, row_mask, col0, K, BLOCK_R, BLOCK_Q)
            y = tl.exp((z - m[:, None]) * inv_tau) * inv_s[:, None]
            if MODE == _BACKWARD:
                y = y * (_grad_tile(grad_ptr, g_rows, g_cs, cols, mask) - dot[:, None]) * inv_tau
            y = tl.where(nan_row[:, None], float("nan"), y)
            tl.store(out_ptr + out_rows[:, None] + cols[None, :].to(tl.int64) * inner,
                     y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kl_kernel(x_ptr, q_ptr, kl_ptr, row_grad_ptr, gx_ptr, gq_ptr, n_rows, K, inner, out_os, x_os, x_is, x_cs,
               q_os, q_is, q_cs, HAS_PRIOR: tl.constexpr, BACKWARD: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row KL(softmax(x) || softmax(q)) (q uniform without a prior); with BACKWARD, the
    gradients of row_grad * KL. Sums are centred on each row's max."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_rows = _row_starts(rows, inner, x_os, x_is)
    q_rows = _row_starts(rows, inner, q_os, q_is)
    m_x = tl.full((BLOCK_R,), _MIN_FLOAT, tl.float32)
    m_q = tl.full((BLOCK_R,), _MIN_FLOAT, tl.float32)
    s_x = tl.zeros((BLOCK_R,), tl.float32)
    s_q = tl.zeros((BLOCK_R,), tl.float32)
    nan_row = tl.zeros((BLOCK_R,), tl.int1)  # a NaN or +inf in the logits or the prior
    for col0 in range(0, K, BLOCK_K):
        x, q, mask = _kl_tile(x_ptr, q_ptr, x_rows, q_rows, x_cs, q_cs, row_mask, col0, K, HAS_PRIOR, BLOCK_K)
        nan_row = nan_row | _nan_or_posinf(x) | _nan_or_posinf(q)
        m_new = tl.maximum(m_x, tl.max(x, axis=1))
        s_x = s_x * tl.exp(m_x - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m_x = m_new
        m_new = tl.maximum(m_q, tl.max(q, axis=1))
        s_q = s_q * tl.exp(m_q - m_new) + tl.sum(tl.exp(q - m_new[:, None]), axis=1)
        m_q = m_new
    weighted = tl.zeros((BLOCK_R,), tl.float32)
    for col0 in range(0, K, BLOCK_K):
        x, q, mask = _kl_tile(x_ptr, q_ptr, x_rows, q_rows, x_cs, q_cs, row_mask, col0, K, HAS_PRIOR, BLOCK_K)
        e = tl.exp(x - m_x[:, None])
        # Classes with p = 0 (masked logits) contribute 0 whatever q is.
        weighted += tl.sum(e * _where_mass(e, x - m_x[:, None], q - m_q[:, None]), axis=1)
    has_mass = s_x > 0
    log_s_x = tl.log(tl.where(has_mass, s_x, 1.0))
    log_s_q = tl.log(tl.where(s_q > 0, s_q, 1.0))  # s_q = 0 only in rows past the end
    kl = tl.where(has_mass, weighted / tl.where(has_mass, s_x, 1.0) - log_s_x + log_s_q, 0.0)
    kl = tl.where(nan_row, float("nan"), kl)
    if not BACKWARD:
        tl.store(kl_ptr + rows, kl, mask=row_mask)
    else:
        g = tl.load(row_grad_ptr + rows, mask=row_mask, other=0.0)
        out_rows = _row_starts(rows, inner, out_os, 1)
        log_norm_x = m_x + log_s_x
        log_norm_q = m_q + log_s_q
        for col0 in range(0, K, BLOCK_K):
            x, q, mask = _kl_tile(x_ptr, q_ptr, x_rows, q_rows, x_cs, q_cs, row_mask, col0, K, HAS_PRIOR, BLOCK_K)
            p = tl.where(has_mass[:, None], tl.exp(x - log_norm_x[:, None]), 0.0)
            log_ratio = _where_mass(p, x - log_norm_x[:, None], q - log_norm_q[:, None])
            gx = tl.where(p > 0, g[:, None] * p * (log_ratio - kl[:, None]), 0.0)
            gx = tl.where(nan_row[:, None], float("nan"), gx)
            offsets = out_rows[:, None] + (col0 + tl.arange(0, BLOCK_K))[None, :].to(tl.int64) * inner
            tl.store(gx_ptr + offsets, gx.to(gx_ptr.dtype.element_ty), mask=mask)
            if HAS_PRIOR:
                # d/dq of -sum p log q is q sum(p) - p; sum(p) is 0 for a row with no mass
                gq = g[:, None] * (tl.where(has_mass[:, None], tl.exp(q - log_norm_q[:, None]), 0.0) - p)
                gq = tl.where(nan_row[:, None], float("nan"), gq)
                tl.store(gq_ptr + offsets, gq.to(gq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _where_mass(p, log_p, log_q):
    """log_p - log_q where p > 0, else 0 (never -inf - -inf for masked classes)."""
    has_mass = p > 0
    return tl.where(has_mass, log_p, 0.0) - tl.where(has_mass, log_q, 0.0)


@triton.jit
def _kl_tile(x_ptr, q_ptr, x_rows, q_rows, x_cs, q_cs, row_mask, col0, K, HAS_PRIOR: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """x and prior logits (zeros for the uniform prior) of one tile as float32, -inf outside."""
    cols = (col0 + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask = row_mask[:, None] & (cols[None, :] < K)
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :] * x_cs, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_PRIOR:
        q = tl.load(q_ptr + q_rows[:, None] + cols[None, :] * q_cs, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        q = tl.where(mask, 0.0, float("-inf"))
    return x, q, mask


# ---------------------------------------------------------------- launchers
def _flat_stride(t, dims):
    """The stride stepping ``dims`` of ``t`` as one flattened dim, or None if none does."""
    stride, expected = 0, None
    for d in reversed(dims):
        if t.shape[d] == 1:
            continue
        if expected is not None and t.stride(d) != expected:
            return None
        if expected is None:
            stride = t.stride(d)
        expected = t.stride(d) * t.shape[d]
    return stride


def _layout(t, dim):
    """(t, outer stride, inner stride, class stride) of ``t`` seen as (outer, K, inner)
    around ``dim``; ``t`` is made contiguous only when its other dims do not flatten."""
    outer, inner = _flat_stride(t, range(dim)), _flat_stride(t, range(dim + 1, t.dim()))
    if outer is None or inner is None:
        return _layout(t.contiguous(), dim)
    return t, outer, inner, t.stride(dim)


def _blocks(rows, K, inner):
    """(BLOCK_R, BLOCK_Q): columns first when rows are contiguous, rows first otherwise
    (adjacent rows of a dim-not-last layout are adjacent in memory)."""
    quads = triton.next_power_of_2(triton.cdiv(K, 4))
    if inner == 1:
        block_q = min(quads, _TILE_ELEMENTS // 4)
        return max(1, min(triton.next_power_of_2(rows), _TILE_ELEMENTS // (4 * block_q))), block_q
    block_r = min(64, triton.next_power_of_2(rows))
    return block_r, max(1, min(quads, _TILE_ELEMENTS // (4 * block_r)))


def _gumbel(mode, x, grad_y, seed, tau, dim):
    """Launch ``_gumbel_kernel`` on ``x``: the logits, or the soft sample for ``_FROM_SAMPLE``
    (which has no noise: ``seed`` is None then)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    K = x.shape[dim]
    if out.numel() == 0:
        return out
    rows, inner = x.numel() // K, out.stride(dim)
    x, x_os, x_is, x_cs = _layout(x, dim)
    g, g_os, g_is, g_cs = _layout(grad_y, dim) if grad_y is not None else (x, 0, 0, 0)
    block_r, block_q = _blocks(rows, K, inner)
    _gumbel_kernel[(triton.cdiv(rows, block_r),)](
        x, g, out, seed, rows, K, inner, K * inner, x_os, x_is, x_cs, g_os, g_is, g_cs, tau, MODE=mode,
        BLOCK_R=block_r, BLOCK_Q=block_q, SINGLE_TILE=4 * block_q >= K, num_warps=8 if block_r * block_q >= 1024 else 4)
    return out


def gumbel_softmax(logits, seed, tau, hard, dim):
    return _gumbel((_HARD if hard else _SOFT).value, logits, None, seed, tau, dim)


def gumbel_softmax_backward(grad_y, logits, seed, tau, dim):
    return _gumbel(_BACKWARD.value, logits, grad_y, seed, tau, dim)


def gumbel_softmax_backward_from_sample(grad_y, y, tau, dim):
    return _gumbel(_FROM_SAMPLE.value, y, grad_y, None, tau, dim)


def _categorical_kl_rows(logits, prior_logits, dim, row_grad=None):
    """Per-row KL (float32), or with ``row_grad`` the [grad_logits(, grad_prior)]."""
    K = logits.shape[dim]
    rows = logits.numel() // K if K else 0
    inner = math.prod(logits.shape[dim + 1:])
    x, x_os, x_is, x_cs = _layout(logits, dim)
    has_prior = prior_logits is not None
    q, q_os, q_is, q_cs = _layout(prior_logits.expand(logits.shape), dim) if has_prior else (x, 0, 0, 0)
    backward = row_grad is not None
    kl = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grads = [torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
             for _ in range((1 + has_prior) if backward else 0)]
    if rows:
        block_k = min(triton.next_power_of_2(K), 4096)
        tile = _TILE_ELEMENTS // (2 if backward and has_prior else 1)  # its five live tiles spilled at 8192
        # At least 2048 elements a program: 16-row tiles of a few classes (16 x 16) left the
        # threads of a block mostly idle; rows are the tile's long side for small K.
        block_r = max(1, min(max(64 if inner > 1 else 16, 2048 // block_k), tile // block_k,
                             triton.next_power_of_2(rows)))
        gx, gq = (grads[0], grads[-1]) if backward else (kl, kl)
        _kl_kernel[(triton.cdiv(rows, block_r),)](
            x, q, kl, row_grad if backward else kl, gx, gq, rows, K, inner, K * inner, x_os, x_is, x_cs,
            q_os, q_is, q_cs, HAS_PRIOR=has_prior, BACKWARD=backward, BLOCK_R=block_r, BLOCK_K=block_k,
            # Live tiles that spilled at 4 warps (sm_90 compile test): backward's, and the forward's
            # with a prior in a full tile.
            num_warps=8 if backward or (has_prior and block_r * block_k >= _TILE_ELEMENTS) else 4)
    return grads if backward else kl


def _batch(logits):
    return logits.shape[0] if logits.dim() > 1 else 1


def categorical_kl(logits, prior_logits, dim, reduction):
    kl = _categorical_kl_rows(logits, prior_logits, dim)
    if reduction == "none":
        return kl.reshape(logits.shape[:dim] + logits.shape[dim + 1:]).to(logits.dtype)
    total = kl.sum(dtype=torch.float64)  # the same bits whatever the reduction's split
    if reduction == "mean":
        total = total / max(kl.numel(), 1)
    elif reduction == "batchmean":
        total = total / _batch(logits)
    return total.to(logits.dtype)


def categorical_kl_backward(grad, logits, prior_logits, dim, reduction):
    rows = logits.numel() // logits.shape[dim] if logits.shape[dim] else 0
    if reduction == "none":
        row_grad = grad.reshape(rows).to(torch.float32).contiguous()
    else:
        scale = {"sum": 1.0, "mean": 1.0 / max(rows, 1), "batchmean": 1.0 / _batch(logits)}[reduction]
        row_grad = (grad.to(torch.float32) * scale).reshape(1).expand(rows).contiguous()
    return _categorical_kl_rows(logits, prior_logits, dim, row_grad)
