"""VQ column in Triton: residual_quantize (R stages of the search), its backward and the
per-stage segment sums of the residuals (the EMA statistics of a residual quantizer).

Backward: one program takes a block of whole rows and walks the R stages with the residual
in registers, ``res <- res - e_r[index_r]``, adding each stage's commitment term
``beta s_r res_{r+1}`` to ``grad_x`` (``s_r = 2 grad_losses[r] / (N D)``, read on the device:
no host sync) and, by default, ``-s_r res_{r+1}`` to code ``index_r``'s gradient with float
atomics: one pass over ``x`` for everything, the residuals never in memory. Under
``torch.use_deterministic_algorithms`` the codebooks' gradient comes instead from
``_stage_sums_kernel``: the rows grouped by (stage, code) by one stable sort, one program per
(stage, code) summing its rows in row order, each row's residual rebuilt from ``x`` and its
codes (R (R + 1) / 2 gathers a row over the stages, in exchange for a fixed order).
"""
import torch
import triton
import triton.language as tl

from .vq import _search


def residual_quantize(x, codebooks, beta):
    """Stage by stage with the search kernels: unlike the native backend, the residual goes
    through memory between stages (a fused multi-stage kernel is future work)."""
    residual = x.to(torch.float32, copy=True)  # updated in place: never x itself
    quantized = torch.zeros_like(residual)
    indices, losses = [], []
    for codebook in codebooks:
        index, _, code, loss_parts = _search(residual, codebook.float(), write_quantized=True)
        quantized += code
        residual -= code
        indices.append(index)
        losses.append(loss_parts.sum())
    losses = (1.0 + beta) * torch.stack(losses) / max(x.numel(), 1)
    return quantized.to(x.dtype), torch.stack(indices, dim=1), losses.to(x.dtype)


@triton.jit
def _residual_backward_kernel(grad_q_ptr, x_ptr, cb_ptr, index_ptr, grad_losses_ptr, grad_x_ptr, grad_cb_ptr, N, K,
                              scale_per_grad, beta, R: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, ATOMIC_CODEBOOK: tl.constexpr):
    """grad_x = g + sum_r beta s_r res_{r+1}; with ATOMIC_CODEBOOK, grad_cb[r, index_r] += -s_r res_{r+1}."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (dims < D)[None, :]
    offs = rows[:, None] * D + dims[None, :]
    res = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(grad_q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for r in range(R):
        scale = scale_per_grad * tl.load(grad_losses_ptr + r).to(tl.float32)
        code = r * K + tl.load(index_ptr + rows * R + r, mask=row_ok, other=0)  # int64 row of (R * K, D)
        res -= tl.load(cb_ptr + code[:, None] * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        out += (beta * scale) * res
        if ATOMIC_CODEBOOK:
            tl.atomic_add(grad_cb_ptr + code[:, None] * D + dims[None, :], -scale * res, mask=mask)
    tl.store(grad_x_ptr + offs, out.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stage_sums_kernel(x_ptr, cb_ptr, index_ptr, order_ptr, offset_ptr, out_ptr, scale_ptr, scale_per_grad, K,
                       R: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                       AFTER_CODE: tl.constexpr):
    """Program (stage r, code c): out[r, c] = scale_r * the sum, in row order, of res_{r+1}
    (AFTER_CODE) or res_r over the rows order[offset[r K + c] : offset[r K + c + 1]],
    scale_r = scale_per_grad * scale_ptr[r]."""
    segment = tl.program_id(0).to(tl.int64)
    stage = segment // K
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dims < D
    start, end = tl.load(offset_ptr + segment), tl.load(offset_ptr + segment + 1)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for p in range(start, end, BLOCK_R):
        pos = p + tl.arange(0, BLOCK_R)
        pos_ok = pos < end
        row = tl.load(order_ptr + pos, mask=pos_ok, other=0)
        mask = pos_ok[:, None] & d_ok[None, :]
        res = tl.load(x_ptr + row[:, None] * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        last = stage + 1 if AFTER_CODE else stage
        for s in range(0, last):
            code = s * K + tl.load(index_ptr + row * R + s, mask=pos_ok, other=0)
            res -= tl.load(cb_ptr + code[:, None] * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(mask, res, 0.0)
    scale = scale_per_grad * tl.load(scale_ptr + stage).to(tl.float32)
    tl.store(out_ptr + segment * D + dims, scale * tl.sum(acc, axis=0), mask=d_ok)


def _stage_sums(x, codebooks, indices, scale, scale_per_grad, after_code):
    """(scale_r * per-(stage, code) sums of the residuals (R, K, D) float32, counts (R, K)),
    deterministic: one stable sort groups the rows by (stage, code) in row order."""
    n, d = x.shape
    stages, k = codebooks.shape[:2]
    keys = (indices.t() + torch.arange(stages, device=x.device)[:, None] * k).reshape(-1)  # stage-major
    counts = torch.zeros(stages * k, device=x.device, dtype=torch.int64).scatter_add_(0, keys, torch.ones_like(keys))
    sums = torch.zeros(stages, k, d, device=x.device, dtype=torch.float32)
    if n:
        order = torch.sort(keys, stable=True).indices % n  # position -> row (keys are stage-major)
        offset = torch.zeros(stages * k + 1, device=x.device, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offset[1:])
        block_d = min(triton.next_power_of_2(max(d, 1)), 128)
        _stage_sums_kernel[(stages * k, triton.cdiv(d, block_d))](
            x, codebooks, indices, order, offset, sums, scale, scale_per_grad, k, R=stages, D=d, BLOCK_R=32,
            BLOCK_D=block_d, AFTER_CODE=after_code)
    return sums, counts.view(stages, k)


def residual_quantize_backward(grad_quantized, grad_losses, x, codebooks, indices, beta, codebook_grad=True):
    x, codebooks, indices = x.contiguous(), codebooks.contiguous(), indices.contiguous()
    n, d = x.shape
    stages, k = codebooks.shape[:2]
    scale_per_grad = 2.0 / max(x.numel(), 1)
    grad_losses = grad_losses.contiguous()
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad_x = torch.empty_like(x)
    # not computed without codebook_grad (unspecified values, as the native backend's)
    grad_cb = (torch.zeros if codebook_grad else torch.empty)(stages, k, d, device=x.device, dtype=torch.float32)
    if n:
        block_d = triton.next_power_of_2(max(d, 1))
        block_n = max(1, min(64, 4096 // block_d))
        _residual_backward_kernel[(triton.cdiv(n, block_n),)](
            grad_quantized.contiguous(), x, codebooks, indices, grad_losses, grad_x, grad_cb, n, k, scale_per_grad,
            beta, R=stages, D=d, BLOCK_N=block_n, BLOCK_D=block_d, ATOMIC_CODEBOOK=codebook_grad and not deterministic)
        if codebook_grad and deterministic:
            grad_cb, _ = _stage_sums(x, codebooks, indices, grad_losses, -scale_per_grad, after_code=True)
    return grad_x, grad_cb.to(codebooks.dtype)


def residual_segment_sums(x, codebooks, indices):
    ones = torch.ones(codebooks.shape[0], device=x.device, dtype=torch.float32)
    return _stage_sums(x.contiguous(), codebooks.contiguous(), indices.contiguous(), ones, 1.0, after_code=False)
