"""VQ column in Triton: vector_quantize's backward (straight-through and rotation-trick
estimators) and the deterministic segment mean of k-means.

The codebook term's gradient sums ``x - e`` over each code's rows: with float atomics by
default, or, under ``torch.use_deterministic_algorithms``, one program per code over its
rows grouped by a stable sort (a fixed order: the same bits every run).
"""
import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _grad_x_kernel(grad_q_ptr, x_ptr, cb_ptr, index_ptr, grad_x_ptr, grad_loss_ptr, N, commit_per_grad,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_x = grad_quantized + beta * scale * (x - e[index]), scale = 2 grad_loss / (N D)."""
    commit = commit_per_grad * tl.load(grad_loss_ptr).to(tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (dims < D)[None, :]
    index = tl.load(index_ptr + rows, mask=rows < N, other=0)
    offs = rows[:, None] * D + dims[None, :]
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ev = tl.load(cb_ptr + index[:, None] * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    gq = tl.load(grad_q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_x_ptr + offs, (gq + commit * (xv - ev)).to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_codebook_atomic_kernel(x_ptr, cb_ptr, index_ptr, grad_cb_ptr, grad_loss_ptr, N, scale_per_grad,
                                 D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_cb[index[r]] += -scale * (x_r - e[index[r]]) with atomics (order varies per run)."""
    neg_scale = -scale_per_grad * tl.load(grad_loss_ptr).to(tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (dims < D)[None, :]
    index = tl.load(index_ptr + rows, mask=rows < N, other=0)
    xv = tl.load(x_ptr + rows[:, None] * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    code = index[:, None] * D + dims[None, :]
    ev = tl.load(cb_ptr + code, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(grad_cb_ptr + code, neg_scale * (xv - ev), mask=mask)


@triton.jit
def _grad_codebook_sorted_kernel(x_ptr, cb_ptr, order_ptr, offset_ptr, grad_cb_ptr, grad_loss_ptr, scale_per_grad,
                                 D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per code: sums its rows (order[offset[c]:offset[c+1]]) in a fixed order."""
    neg_scale = -scale_per_grad * tl.load(grad_loss_ptr).to(tl.float32)
    code = tl.program_id(0).to(tl.int64)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dims < D
    start, end = tl.load(offset_ptr + code), tl.load(offset_ptr + code + 1)
    ev = tl.load(cb_ptr + code * D + dims, mask=d_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for p in range(start, end, BLOCK_R):
        pos = p + tl.arange(0, BLOCK_R)
        row = tl.load(order_ptr + pos, mask=pos < end, other=0)
        mask = (pos < end)[:, None] & d_ok[None, :]
        xv = tl.load(x_ptr + row[:, None] * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(mask, xv - ev[None, :], 0.0)
    tl.store(grad_cb_ptr + code * D + dims, neg_scale * tl.sum(acc, axis=0), mask=d_ok)


def _block_d(x, d):
    return min(triton.next_power_of_2(max(d, 1)), 128 if _launch.gpu_launch(x) else 256)


def _codebook_grad(grad_loss, x, codebook, indices):
    """The codebook term's gradient ``-scale * sum over each code's rows of (x - e)``, float32."""
    n, d = x.shape
    k = codebook.shape[0]
    scale_per_grad = 2.0 / max(x.numel(), 1)  # times grad_loss, read by the kernels (no host sync)
    block_n, block_d = 64, _block_d(x, d)
    grad_cb = torch.zeros(k, d, device=x.device, dtype=torch.float32)
    if n == 0:
        return grad_cb
    if torch.are_deterministic_algorithms_enabled():
        # Sorted segment sums: a stable sort groups each code's rows in row order; code c's
        # rows start where c would be inserted (searchsorted: no host sync, unlike bincount).
        sorted_indices, order = torch.sort(indices, stable=True)
        offset = torch.searchsorted(sorted_indices, torch.arange(k + 1, device=x.device, dtype=torch.int64))
        _grad_codebook_sorted_kernel[(k, triton.cdiv(d, block_d))](x, codebook, order, offset, grad_cb, grad_loss,
                                                                    scale_per_grad, D=d,
                                                                    BLOCK_R=block_n, BLOCK_D=block_d)
    else:
        _grad_codebook_atomic_kernel[(triton.cdiv(n, block_n), triton.cdiv(d, block_d))](
            x, codebook, indices, grad_cb, grad_loss, n, scale_per_grad, D=d, BLOCK_N=block_n, BLOCK_D=block_d)
    return grad_cb


def vector_quantize_backward(grad_quantized, grad_loss, x, codebook, indices, beta):
    x, codebook, indices = x.contiguous(), codebook.contiguous(), indices.contiguous()
    grad_quantized = grad_quantized.contiguous()
    n, d = x.shape
    block_n, block_d = 64, _block_d(x, d)
    grad_x = torch.empty_like(x)
    if n:
        _grad_x_kernel[(triton.cdiv(n, block_n), triton.cdiv(d, block_d))](
            grad_quantized, x, codebook, indices, grad_x, grad_loss, n, beta * 2.0 / max(x.numel(), 1), D=d,
            BLOCK_N=block_n, BLOCK_D=block_d)
    return grad_x, _codebook_grad(grad_loss, x, codebook, indices).to(codebook.dtype)


@triton.jit
def _grad_x_rotation_kernel(grad_q_ptr, x_ptr, cb_ptr, index_ptr, grad_x_ptr, grad_loss_ptr, N, commit_per_grad,
                            D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_x = |e|/|x| (g - 2 w (w.g) + 2 u (q.g)) + beta * scale * (x - e), whole rows per
    program (u = x/|x|, q = e/|e|, w = (u + q)/|u + q|); g where |x| = 0."""
    commit = commit_per_grad * tl.load(grad_loss_ptr).to(tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (dims < D)[None, :]
    index = tl.load(index_ptr + rows, mask=rows < N, other=0)
    offs = rows[:, None] * D + dims[None, :]
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ev = tl.load(cb_ptr + index[:, None] * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x_norm = tl.sqrt(tl.sum(xv * xv, axis=1))
    e_norm = tl.sqrt(tl.sum(ev * ev, axis=1))
    inv_x = tl.where(x_norm > 0, 1.0 / tl.where(x_norm > 0, x_norm, 1.0), 0.0)
    inv_e = tl.where(e_norm > 0, 1.0 / tl.where(e_norm > 0, e_norm, 1.0), 0.0)
    u = xv * inv_x[:, None]
    q = ev * inv_e[:, None]
    w = u + q
    w_norm = tl.sqrt(tl.sum(w * w, axis=1))
    w = w * tl.where(w_norm > 0, 1.0 / tl.where(w_norm > 0, w_norm, 1.0), 0.0)[:, None]
    wg = tl.sum(w * g, axis=1)
    qg = tl.sum(q * g, axis=1)
    rotated = (e_norm * inv_x)[:, None] * (g - 2.0 * w * wg[:, None] + 2.0 * u * qg[:, None])
    out = tl.where((x_norm > 0)[:, None], rotated, g) + commit * (xv - ev)
    tl.store(grad_x_ptr + offs, out.to(grad_x_ptr.dtype.element_ty), mask=mask)


def vector_quantize_rotation_backward(grad_quantized, grad_loss, x, codebook, indices, beta):
    # The codebook term is the straight-through one; grad_x is the rotation kernel's alone.
    x, codebook, indices = x.contiguous(), codebook.contiguous(), indices.contiguous()
    n, d = x.shape
    grad_x = torch.empty_like(x)
    if n:
        block_d = triton.next_power_of_2(max(d, 1))
        block_n = max(1, min(64, 4096 // block_d))
        _grad_x_rotation_kernel[(triton.cdiv(n, block_n),)](
            grad_quantized.contiguous(), x, codebook, indices, grad_x, grad_loss, n, beta * 2.0 / max(x.numel(), 1),
            D=d, BLOCK_N=block_n, BLOCK_D=block_d)
    return grad_x, _codebook_grad(grad_loss, x, codebook, indices).to(codebook.dtype)


def segment_mean(x, indices, num_segments):
    """Deterministic: rows grouped by a stable sort and summed in row order by the codebook
    kernel (``-scale * sum(x - 0)`` with scale -1), then divided by the counts."""
    x, n, d = x.float().contiguous(), x.shape[0], x.shape[1]
    counts = indices.new_zeros(num_segments).scatter_add_(0, indices, torch.ones_like(indices))  # no host sync
    sums = torch.zeros(num_segments, d, device=x.device, dtype=torch.float32)
    if n:
        order = torch.sort(indices, stable=True).indices
        offset = torch.zeros(num_segments + 1, device=x.device, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offset[1:])
        block_d = min(triton.next_power_of_2(max(d, 1)), 256)
        zeros = torch.zeros(num_segments, d, device=x.device, dtype=torch.float32)
        minus_one = torch.full((1,), -1.0, device=x.device)
        _grad_codebook_sorted_kernel[(num_segments, triton.cdiv(d, block_d))](
            x, zeros, order, offset, sums, minus_one, 1.0, D=d, BLOCK_R=64, BLOCK_D=block_d)
    return sums / counts.clamp_min(1)[:, None], counts
