"""The specs of the VQ column's ops (nearest-code search, vector quantization and its
straight-through and rotation-trick gradients), part of the ``torch`` backend:
``fastvae.reference`` re-exports these functions. Inputs arrive as there: ``x`` ``(N, D)``,
``codebook`` ``(K, D)``, ``indices`` ``(N,)`` int64."""
import torch

from .reference import compute_dtype

_REFERENCE_ROW_BLOCK = 4096


def _argmin_nan_first(sq_dist):
    """Index of the first NaN of each row, else of its first minimum (torch.argmin's rule,
    spelled out: squared distances are >= 0, so -1 ranks a NaN below all of them)."""
    return torch.where(sq_dist.isnan(), -1.0, sq_dist).argmin(dim=1)


def nearest_code(x, codebook):
    """Exhaustive argmin of squared L2 distance, in row blocks so memory stays bounded.

    Codes are ranked by ``||e||^2 - 2 x.e`` (``||x||^2`` is constant per row). That
    expansion's rounding error is at most ``B = (D + 4) u (max ||e||^2 + 2 ||x|| max ||e||)``
    (``u`` the unit roundoff), which with large norms exceeds the gaps between distances;
    rows whose runner-up is not surely more than ``2B`` above the best (near-ties, and any
    row where the expansion or ``B`` is inf or NaN: an overflow at ``|x| ~ 1e19`` in
    float32, a NaN or inf in ``x`` or the codebook) are re-ranked by the exact
    ``(x - e)^2``. Ties go to the lowest index, all-inf rows included; a NaN distance ranks
    first (NaN in, NaN out: a NaN row of ``x`` takes code 0, a NaN code is the nearest code
    of every row, and ``sq_dist`` is NaN), as :func:`torch.argmin` of the distance matrix.
    """
    ct = compute_dtype(x)
    xc, cb = x.to(ct), codebook.to(ct)
    cb_sq = (cb * cb).sum(dim=1)
    max_norm = cb_sq.max().sqrt() if cb.shape[0] else cb_sq.new_zeros(())  # NaN when a code holds one
    rounding = (x.shape[1] + 4) * torch.finfo(ct).eps / 2
    indices = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], _REFERENCE_ROW_BLOCK):
        block = xc[start:start + _REFERENCE_ROW_BLOCK]
        ranking = torch.addmm(cb_sq, block, cb.t(), alpha=-2.0)
        best = ranking.argmin(dim=1)
        if cb.shape[0] > 1:
            two = ranking.topk(2, dim=1, largest=False).values
            bound = rounding * (max_norm**2 + 2.0 * block.norm(dim=1) * max_norm)
            ambiguous = (~(two[:, 1] - two[:, 0] > 2.0 * bound)).nonzero().squeeze(1)
            # Exact distances of the ambiguous rows, a few rows at a time (rows x K x D).
            step = max(1, 2**24 // max(cb.numel(), 1))
            for rows in ambiguous.split(step):
                best[rows] = _argmin_nan_first(((block[rows, None, :] - cb[None]) ** 2).sum(dim=2))
        indices[start:start + block.shape[0]] = best
    sq_dist = ((xc - cb[indices]) ** 2).sum(dim=1)
    return indices, sq_dist.to(x.dtype).contiguous()


def vector_quantize(x, codebook, beta):
    indices, sq_dist = nearest_code(x, codebook)
    ct = compute_dtype(x)
    mse = sq_dist.to(ct).sum() / max(x.numel(), 1)
    quantized = codebook[indices].to(x.dtype)
    return quantized, indices, ((1.0 + beta) * mse).to(x.dtype)


def vector_quantize_backward(grad_quantized, grad_loss, x, codebook, indices, beta):
    """Straight-through + commitment gradient for x; codebook term for the codebook.

    Differentiable as autograd of the loss formula is: its stop-gradients make x's
    gradient constant in the codebook and the codebook's constant in x.
    """
    ct = compute_dtype(x)
    xc, code = x.to(ct), codebook.to(ct)[indices]
    scale = grad_loss.to(ct) * 2.0 / max(x.numel(), 1)
    grad_x = grad_quantized.to(ct) + beta * scale * (xc - code.detach())
    zeros = torch.zeros(codebook.shape, dtype=ct, device=codebook.device)
    grad_codebook = zeros.index_add(0, indices, scale * (code - xc.detach()))  # out of place: vmap-able
    return grad_x.to(x.dtype).contiguous(), grad_codebook.to(codebook.dtype)


def _rotation_grad(g, x, e):
    """Rotation-trick gradient |e|/|x| (g - 2 w (w.g) + 2 u (q.g)) per row (Fifty et al. 2024),
    u = x/|x|, q = e/|e|, w = (u + q)/|u + q|; g itself where |x| = 0, q = 0 where |e| = 0,
    w = 0 where u = -q."""
    def unit(v):
        norm = v.norm(dim=1, keepdim=True)
        return torch.where(norm > 0, v / torch.where(norm > 0, norm, 1.0), 0.0), norm

    u, x_norm = unit(x)
    q, e_norm = unit(e)
    w, _ = unit(u + q)
    dot = lambda a, b: (a * b).sum(dim=1, keepdim=True)  # noqa: E731
    rotated = e_norm / torch.where(x_norm > 0, x_norm, 1.0) * (g - 2 * w * dot(w, g) + 2 * u * dot(q, g))
    return torch.where(x_norm > 0, rotated, g)


def vector_quantize_rotation_backward(grad_quantized, grad_loss, x, codebook, indices, beta):
    """As vector_quantize_backward, with the rotation trick's gradient to x in place of the
    straight-through copy of ``grad_quantized`` (the codebook's gradient is unchanged)."""
    ct = compute_dtype(x)
    grad_x, grad_codebook = vector_quantize_backward(grad_quantized, grad_loss, x, codebook, indices, beta)
    g = grad_quantized.to(ct)
    # u, q, w and the scale are constants of the rotation (the paper's stop-gradients), so the
    # formula is linear in g under create_graph=True as well.
    grad_x = grad_x.to(ct) - g + _rotation_grad(g, x.detach().to(ct), codebook.detach().to(ct)[indices])
    return grad_x.to(x.dtype).contiguous(), grad_codebook
