"""Gaussian column in Triton: reparameterize, gaussian_kl, reparameterize_kl and their
backwards (the backend interface of fastvae/reference.py).

Two kernels do all six: ``_forward_kernel`` (sample and/or KL) and ``_backward_kernel``
(sampling and/or KL gradients), specialised by constexpr flags, plus ``_sum_kernel``
for the reductions. Each program takes BLOCK consecutive elements of the row-major flat
index; its noise is ``normal4`` of the BLOCK // 4 groups it covers, interleaved into
element order in registers, never stored. Reductions write one float32 partial per
program, summed by one program in a fixed order: same input, same bits, no atomics. The
per_sample reduction runs its forward on a grid of (sample, chunk) programs, each
within one sample, and sums each sample's partials likewise.

Every input is addressed as a (rows, cols) matrix in the output's layout (cols = mu's
last dimension): a row-strided slice is read in place, and a broadcast prior ((D,),
(B, 1), a scalar) is read through a zero stride, never expanded in memory. When every
input is contiguous (FLAT) the index is used directly.
"""
import math

import torch
import triton
import triton.language as tl

from ._rng import normal4

BLOCK = 1024
SUM_BLOCK = 4096
_REDUCTIONS = {"none": 0, "sum": 1, "mean": 1, "batchmean": 1, "per_sample": 2}


@triton.jit
def _load(ptr, i, row, col, row_stride, col_stride, mask, FLAT: tl.constexpr):
    offset = i if FLAT else row * row_stride + col * col_stride
    return tl.load(ptr + offset, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _block(n, cols, inner, chunks, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's elements: flat index, in-bounds mask, (row, col) of the row view.
    PER_SAMPLE: program p takes chunk p % chunks of sample p // chunks (``inner`` elements)."""
    pid = tl.program_id(0).to(tl.int64)
    if PER_SAMPLE:
        local = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
        i = (pid // chunks) * inner + local
        mask = local < inner
    else:
        i = pid * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
    return pid, i, mask, i // cols, i % cols


@triton.jit
def _noise(seed_ptr, i, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """N(0, 1) for the consecutive elements i: lane k of group g is element 4g + k.
    ALIGNED (i[0] a multiple of 4): one Philox call per group, interleaved in registers;
    else one per element, keeping the lane it needs."""
    seed = tl.load(seed_ptr)
    if ALIGNED:
        groups = tl.min(i, axis=0) // 4 + tl.arange(0, BLOCK // 4)
        n0, n1, n2, n3 = normal4(seed, groups)
        return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])
    n0, n1, n2, n3 = normal4(seed, i // 4)
    lane = i % 4
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit
def _forward_kernel(mu_ptr, lv_ptr, pm_ptr, plv_ptr, seed_ptr, z_ptr, kl_ptr, n, cols, inner, chunks, divisor,
                    mu_rs, mu_cs, lv_rs, lv_cs, pm_rs, pm_cs, plv_rs, plv_cs,
                    SAMPLE: tl.constexpr, KL: tl.constexpr, REDUCE: tl.constexpr, PRIOR: tl.constexpr,
                    ALIGNED: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr):
    pid, i, mask, row, col = _block(n, cols, inner, chunks, REDUCE == 2, BLOCK)
    m = _load(mu_ptr, i, row, col, mu_rs, mu_cs, mask, FLAT)
    v = _load(lv_ptr, i, row, col, lv_rs, lv_cs, mask, FLAT)
    if SAMPLE:
        z = m + tl.exp(0.5 * v) * _noise(seed_ptr, i, ALIGNED, BLOCK)
        tl.store(z_ptr + i, z.to(z_ptr.dtype.element_ty), mask=mask)
    if KL:
        if PRIOR:
            pm = _load(pm_ptr, i, row, col, pm_rs, pm_cs, mask, FLAT)
            plv = _load(plv_ptr, i, row, col, plv_rs, plv_cs, mask, FLAT)
            diff = m - pm
            kl = 0.5 * (plv - v + (tl.exp(v) + diff * diff) * tl.exp(-plv) - 1.0)
        else:
            kl = 0.5 * (tl.exp(v) + m * m - 1.0 - v)
        if REDUCE > 0:  # one partial per program (float32), or the result itself if one program
            tl.store(kl_ptr + pid, (tl.sum(tl.where(mask, kl, 0.0), axis=0) / divisor).to(kl_ptr.dtype.element_ty))
        else:
            tl.store(kl_ptr + i, kl.to(kl_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_kernel(partial_ptr, out_ptr, count, divisor, SUM_BLOCK: tl.constexpr):
    """out[p] = sum(partials[p * count:(p + 1) * count]) / divisor, chunk by chunk in a
    fixed order (program p; one program for a reduction to a scalar)."""
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([SUM_BLOCK], dtype=tl.float32)
    for start in range(0, count, SUM_BLOCK):
        offsets = start + tl.arange(0, SUM_BLOCK)
        acc += tl.load(partial_ptr + pid * count + offsets, mask=offsets < count, other=0.0)
    tl.store(out_ptr + pid, (tl.sum(acc, axis=0) / divisor).to(out_ptr.dtype.element_ty))


@triton.jit
def _backward_kernel(gz_ptr, gk_ptr, mu_ptr, lv_ptr, pm_ptr, plv_ptr, seed_ptr,
                     g_mu_ptr, g_lv_ptr, g_pm_ptr, g_plv_ptr, n, cols, inner, chunks, scale,
                     gz_rs, gz_cs, gk_rs, gk_cs, mu_rs, mu_cs, lv_rs, lv_cs, pm_rs, pm_cs, plv_rs, plv_cs,
                     SAMPLE: tl.constexpr, KL: tl.constexpr, REDUCE: tl.constexpr, PRIOR: tl.constexpr,
                     DENSE_GRAD_MU: tl.constexpr, ALIGNED: tl.constexpr, FLAT: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid, i, mask, row, col = _block(n, cols, inner, chunks, False, BLOCK)
    v = _load(lv_ptr, i, row, col, lv_rs, lv_cs, mask, FLAT)
    std = tl.exp(0.5 * v)
    g_lv = tl.zeros([BLOCK], dtype=tl.float32)
    if SAMPLE:  # d z / d logvar = eps * std / 2, eps regenerated from the seed
        gz = _load(gz_ptr, i, row, col, gz_rs, gz_cs, mask, FLAT)
        g_lv = 0.5 * gz * std * _noise(seed_ptr, i, ALIGNED, BLOCK)
    if KL:
        m = _load(mu_ptr, i, row, col, mu_rs, mu_cs, mask, FLAT)
        if REDUCE == 2:  # per_sample: one gradient per sample (contiguous), shared by its elements
            gk = tl.load(gk_ptr + i // inner, mask=mask, other=0.0).to(tl.float32)
        elif REDUCE == 1:
            gk = tl.load(gk_ptr).to(tl.float32) * scale
        else:
            gk = _load(gk_ptr, i, row, col, gk_rs, gk_cs, mask, FLAT) * scale
        if PRIOR:
            pm = _load(pm_ptr, i, row, col, pm_rs, pm_cs, mask, FLAT)
            plv = _load(plv_ptr, i, row, col, plv_rs, plv_cs, mask, FLAT)
            diff = m - pm
            inv_prior_var = tl.exp(-plv)
            g_mu = gk * diff * inv_prior_var
            g_lv_kl = 0.5 * gk * (std * std * inv_prior_var - 1.0)
            tl.store(g_pm_ptr + i, (-g_mu).to(g_pm_ptr.dtype.element_ty), mask=mask)
            tl.store(g_plv_ptr + i, (-g_lv_kl - 0.5 * diff * g_mu).to(g_plv_ptr.dtype.element_ty), mask=mask)
        else:
            g_mu = gk * m
            g_lv_kl = 0.5 * gk * (std * std - 1.0)
        if SAMPLE:  # reparameterize_kl: z passes grad_z straight to mu
            g_mu += gz
        g_lv += g_lv_kl
        tl.store(g_mu_ptr + i, g_mu.to(g_mu_ptr.dtype.element_ty), mask=mask)
    elif DENSE_GRAD_MU:  # reparameterize: mu's gradient is grad_z, written densely on request
        tl.store(g_mu_ptr + i, gz.to(g_mu_ptr.dtype.element_ty), mask=mask)
    tl.store(g_lv_ptr + i, g_lv.to(g_lv_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers
def _as_rows(t, shape):
    """(tensor, row_stride, col_stride) addressing ``t`` broadcast to ``shape`` as a
    (rows, cols) matrix; layouts a zero or unit column stride cannot express are copied."""
    cols = shape[-1] if len(shape) else 1
    rows = shape.numel() // cols if cols else 0
    expanded = t.expand(shape)
    try:
        matrix = expanded.view(rows, cols)
        if matrix.stride(1) in (0, 1) or cols == 1:
            return expanded, matrix.stride(0) if rows > 1 else 0, matrix.stride(1) if cols > 1 else 0
    except RuntimeError:  # not expressible as a (rows, cols) view
        pass
    return expanded.contiguous(), cols, 1


def _divisor(reduction, mu):
    """The reduced KL is sum / divisor (1 for "none" and "sum")."""
    if reduction == "mean":
        return float(max(mu.numel(), 1))
    if reduction == "batchmean":
        return float(mu.shape[0]) if mu.dim() else 1.0
    return 1.0


def _per_sample_grid(mu):
    """(inner, chunks): the elements of one sample and the BLOCK-sized chunks covering it."""
    inner = mu.numel() // mu.shape[0] if mu.shape[0] else 0
    return inner, triton.cdiv(inner, BLOCK)


def _launch(kernel, mu, operands, outputs, seed, scale, per_sample_grid=False, inner=1, **flags):
    """Launch ``kernel`` over mu's elements. ``operands``: input tensors broadcast to mu's
    shape (None: unused slot), or a 0-d tensor the kernel reads once (wrapped in a tuple);
    ``outputs``: contiguous tensors or None (unused); ``scale``: the kernel's float argument
    (forward: the reduction's divisor, backward: the KL gradient's scale). ``per_sample_grid``:
    one program per (sample, chunk) of :func:`_per_sample_grid` rather than per BLOCK of the
    flat index;
    ``inner``: the elements per sample, for kernels that need it."""
    n, shape = mu.numel(), mu.shape
    if n == 0:
        return
    tensors, strides, flat = [], [], True
    for t in operands:
        if isinstance(t, tuple):  # a scalar, read once whatever the layout
            tensors.append(t[0])
            strides += [0, 0]
            continue
        t, row_stride, col_stride = _as_rows(mu if t is None else t, shape)
        tensors.append(t)
        strides += [row_stride, col_stride]
        flat = flat and t.is_contiguous()
    outputs = [mu if o is None else o for o in outputs]  # unused pointer slots
    if per_sample_grid:
        inner, chunks = _per_sample_grid(mu)
        grid, aligned = shape[0] * chunks, inner % 4 == 0  # a chunk then starts a Philox group
    else:
        chunks, grid, aligned = 1, triton.cdiv(n, BLOCK), True
    kernel[(grid,)](*tensors, mu if seed is None else seed, *outputs, n, shape[-1] if len(shape) else 1,
                    inner, chunks, scale, *strides, ALIGNED=aligned, FLAT=flat, BLOCK=BLOCK, **flags)


_ZEROS = {}


def _zero(like):
    """A 0-d zero on ``like``'s device and dtype (the missing one of two priors), made once
    per device and dtype rather than filled on every call."""
    key = (like.device, like.dtype)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = like.new_zeros(())
    return zero


def _forward(mu, logvar, prior_mu, prior_logvar, seed, sample, reduction):
    kl = reduction is not None
    reduce = _REDUCTIONS[reduction] if kl else 0
    z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device) if sample else None
    kl_out = None
    # One program reduces the whole KL itself and writes it: no partials, no second launch.
    single = reduce == 1 and triton.cdiv(mu.numel(), BLOCK) == 1
    if single:
        kl_out = torch.empty((), dtype=mu.dtype, device=mu.device)
    elif kl:
        inner, chunks = _per_sample_grid(mu) if reduce == 2 else (0, 0)
        shape = (triton.cdiv(mu.numel(), BLOCK),) if reduce == 1 else (mu.shape[0] * chunks,) if reduce else mu.shape
        kl_out = torch.empty(shape, dtype=torch.float32 if reduce else mu.dtype, device=mu.device)
    prior = prior_mu is not None or prior_logvar is not None
    zero = _zero(mu)
    priors = [(zero if p is None else p) if prior else None for p in (prior_mu, prior_logvar)]
    _launch(_forward_kernel, mu, [mu, logvar] + priors, [z, kl_out], seed, _divisor(reduction, mu) if single else 1.0,
            per_sample_grid=reduce == 2, SAMPLE=sample, KL=kl, REDUCE=reduce, PRIOR=prior)
    if reduce == 1 and not single:
        total = torch.empty((), dtype=mu.dtype, device=mu.device)
        _sum_kernel[(1,)](kl_out, total, kl_out.numel(), _divisor(reduction, mu), SUM_BLOCK=SUM_BLOCK)
        kl_out = total
    elif reduce == 2:
        totals = torch.empty(mu.shape[:1], dtype=mu.dtype, device=mu.device)
        if mu.shape[0]:
            _sum_kernel[(mu.shape[0],)](kl_out, totals, chunks, 1.0, SUM_BLOCK=SUM_BLOCK)
        kl_out = totals
    return z, kl_out


def _backward(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed, reduction, dense_grad_mu=False):
    sample, kl = grad_z is not None, grad_kl is not None
    reduce = _REDUCTIONS[reduction] if kl else 0
    prior = prior_mu is not None or prior_logvar is not None
    count = 4 if prior else 2 if kl or dense_grad_mu else 1
    grads = [torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device) for _ in range(count)]
    g_mu, g_lv = (None, grads[0]) if count == 1 else grads[:2]
    g_pm, g_plv = grads[2:] if prior else (None, None)
    zero = _zero(logvar)
    priors = [(zero if p is None else p) if prior else None for p in (prior_mu, prior_logvar)]
    divisor = _divisor(reduction, logvar)
    scale = 1.0 / divisor if divisor else math.nan  # divisor 0: an empty batch, nothing to scale
    inner = 1
    if reduce == 1:  # a reduction's gradient is a scalar
        grad_kl = (grad_kl,)
    elif reduce == 2:  # one per sample, read at i // inner
        grad_kl, inner = (grad_kl.contiguous(),), _per_sample_grid(logvar)[0]
    _launch(_backward_kernel, logvar, [grad_z, grad_kl, mu, logvar] + priors, [g_mu, g_lv, g_pm, g_plv], seed,
            scale, inner=inner, SAMPLE=sample, KL=kl, REDUCE=reduce, PRIOR=prior, DENSE_GRAD_MU=dense_grad_mu)
    return grads


# ---------------------------------------------------------------- the backend interface
def reparameterize(mu, logvar, seed):
    return _forward(mu, logvar, None, None, seed, True, None)[0]


# z, the forward's sample, is not used: on a GPU regenerating eps in registers is cheaper
# than reading z and mu.
def reparameterize_backward(grad_z, mu, logvar, z, seed, dense_grad_mu):
    return _backward(grad_z, None, None, logvar, None, None, seed, None, dense_grad_mu)


def gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction):
    return _forward(mu, logvar, prior_mu, prior_logvar, None, False, reduction)[1]


def gaussian_kl_backward(grad, mu, logvar, prior_mu, prior_logvar, reduction):
    return _backward(None, grad, mu, logvar, prior_mu, prior_logvar, None, reduction)


def reparameterize_kl(mu, logvar, seed, reduction):
    return _forward(mu, logvar, None, None, seed, True, reduction)


def reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, z, seed, reduction):
    return _backward(grad_z, grad_kl, mu, logvar, None, None, seed, reduction)
