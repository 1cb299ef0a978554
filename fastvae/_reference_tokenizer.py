"""The specs of the VQ column's tokenizer ops (residual VQ and the segment sums behind
k-means and the EMA codebooks), part of the ``torch`` backend: ``fastvae.reference``
re-exports these functions. Inputs arrive as there: ``x`` ``(N, D)``, ``codebooks``
``(R, K, D)``, ``indices`` ``(N, R)`` int64."""
import torch

from .reference import compute_dtype, nearest_code


def residual_quantize(x, codebooks, beta):
    """R stages of vector_quantize, stage r on the residual left by the earlier ones:
    (sum of the codes, indices (N, R), per-stage losses (R,))."""
    ct = compute_dtype(x)
    residual = x.to(ct)
    quantized = torch.zeros_like(residual)
    indices, losses = [], []
    for codebook in codebooks:
        index, sq_dist = nearest_code(residual, codebook.to(ct))
        code = codebook.to(ct)[index]
        quantized, residual = quantized + code, residual - code
        indices.append(index)
        losses.append((1.0 + beta) * sq_dist.sum() / max(x.numel(), 1))
    return (quantized.to(x.dtype), torch.stack(indices, dim=1).reshape(x.shape[0], len(codebooks)),
            torch.stack(losses).to(x.dtype))


def residual_quantize_backward(grad_quantized, grad_losses, x, codebooks, indices, beta, codebook_grad=True):
    """Straight-through to x; stage r's loss reaches x through its residual (commitment) and
    codebook r through its codes; earlier stages' codes are constants in the residual.
    Without ``codebook_grad`` the codebooks' gradient is not computed (zeros here; backends
    may leave it unset)."""
    ct = compute_dtype(x)
    residual = x.to(ct)
    grad_x = grad_quantized.to(ct).clone()
    grad_codebooks = torch.zeros(codebooks.shape, dtype=ct, device=codebooks.device)
    for r in range(codebooks.shape[0]):
        scale = grad_losses[r].to(ct) * 2.0 / max(x.numel(), 1)
        residual = residual - codebooks[r].to(ct)[indices[:, r]]  # res_r - e_r
        grad_x += beta * scale * residual
        if codebook_grad:
            grad_codebooks[r].index_add_(0, indices[:, r], -scale * residual)
    return grad_x.to(x.dtype).contiguous(), grad_codebooks.to(codebooks.dtype)


def residual_segment_sums(x, codebooks, indices):
    """Per stage r and code c, the sum of the stage inputs ``res_r = x - sum_{j<r} e_j`` of
    the rows with ``indices[:, r] == c`` (float32, float64 for float64 x) and their count
    (int64): ``(sums (R, K, D), counts (R, K))``, residual VQ's EMA statistics."""
    ct = compute_dtype(x)
    residual = x.to(ct)
    stages, num_codes, dim = codebooks.shape
    sums = torch.zeros(stages, num_codes, dim, dtype=ct, device=x.device)
    counts = torch.zeros(stages, num_codes, dtype=torch.int64, device=x.device)
    for r in range(stages):
        sums[r].index_add_(0, indices[:, r], residual)
        counts[r].scatter_add_(0, indices[:, r], torch.ones_like(indices[:, r]))  # bincount syncs on CUDA
        residual = residual - codebooks[r].to(ct)[indices[:, r]]
    return sums, counts


def segment_mean(x, indices, num_segments):
    """(mean of the rows of x assigned to each segment (0 when none), counts int64): k-means' update."""
    ct = compute_dtype(x)
    counts = torch.bincount(indices, minlength=num_segments)
    sums = torch.zeros(num_segments, x.shape[1], dtype=ct, device=x.device).index_add_(0, indices, x.to(ct))
    return sums / counts.clamp_min(1)[:, None].to(ct), counts
