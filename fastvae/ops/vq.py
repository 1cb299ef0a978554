"""VQ column: nearest_code (exhaustive nearest-codebook search) and vector_quantize."""
import torch

from ._common import check_float, define

_nearest_code = define(
    "nearest_code(Tensor x, Tensor codebook) -> (Tensor, Tensor)",
    lambda x, codebook: (x.new_empty(x.shape[:1], dtype=torch.int64), x.new_empty(x.shape[:1])))
_vector_quantize = define(
    "vector_quantize(Tensor x, Tensor codebook, float beta) -> (Tensor, Tensor, Tensor)",
    lambda x, codebook, beta: (x.new_empty(x.shape), x.new_empty(x.shape[:1], dtype=torch.int64), x.new_empty(())))
_vector_quantize_backward = define(
    "vector_quantize_backward(Tensor grad_quantized, Tensor grad_loss, Tensor x, Tensor codebook, "
    "Tensor indices, float beta) -> (Tensor, Tensor)",
    lambda grad_quantized, grad_loss, x, codebook, indices, beta: (x.new_empty(x.shape),
                                                                    codebook.new_empty(codebook.shape)))


class _VectorQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codebook, beta):
        quantized, indices, loss = _vector_quantize(x, codebook, beta)
        ctx.save_for_backward(x, codebook, indices)
        ctx.beta = beta
        ctx.mark_non_differentiable(indices)
        return quantized, indices, loss

    @staticmethod
    def backward(ctx, grad_quantized, grad_indices, grad_loss):
        x, codebook, indices = ctx.saved_tensors
        grad_x, grad_codebook = _vector_quantize_backward(grad_quantized, grad_loss, x, codebook, indices, ctx.beta)
        return grad_x, grad_codebook, None


def _flatten(x, codebook):
    """Check ``x`` and ``codebook``; return ``x`` as (N, D) and the codebook in x's dtype."""
    check_float("x", x)
    check_float("codebook", codebook)
    if codebook.device != x.device:
        raise ValueError(f"codebook is on {codebook.device} but x is on {x.device}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D (num_codes, dim), got shape {tuple(codebook.shape)}")
    if x.dim() == 0 or x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"x's last dimension ({x.shape[-1] if x.dim() else 'none'}) must equal the codebook's "
                         f"dim ({codebook.shape[1]})")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must have at least one code")
    # Under autocast x is often half while the codebook parameter stays float32.
    return x.reshape(-1, x.shape[-1]), codebook.to(x.dtype)


def nearest_code(x, codebook):
    """Nearest codebook entry of every vector of ``x``.

    ``x``: ``(..., D)``; ``codebook``: ``(K, D)``. Returns ``indices`` (int64, shape
    ``x.shape[:-1]``), the argmin over codes of the squared L2 distance (ties to the
    lowest index, as :func:`torch.argmin`), and ``sq_dist``, that distance, in ``x``'s
    dtype. Works tile by tile: the ``(N, K)`` distance matrix is never made. Not
    differentiable (use :func:`vector_quantize` for training). Non-finite input follows
    :func:`torch.argmin` of the distance matrix: a NaN distance ranks first, so a row of
    ``x`` holding a NaN gets code 0 and a code holding a NaN is every row's nearest, with
    ``sq_dist`` (and :func:`vector_quantize`'s loss) NaN; a row whose distances are all
    ``+inf`` gets code 0.
    """
    flat, codebook = _flatten(x, codebook)
    indices, sq_dist = _nearest_code(flat, codebook)
    return indices.reshape(x.shape[:-1]), sq_dist.reshape(x.shape[:-1])


def vector_quantize(x, codebook, *, beta=0.25):
    """VQ-VAE quantization: ``(quantized, indices, loss)``.

    ``quantized`` equals ``codebook[indices]`` in value and passes its gradient straight
    through to ``x`` (``x + sg(codebook[indices] - x)``); ``loss = mse(codebook[indices],
    sg(x)) + beta * mse(x, sg(codebook[indices]))``, whose gradients reach ``codebook``
    (codebook term) and ``x`` (commitment term). ``x``: ``(..., D)``; ``codebook``:
    ``(K, D)``, cast to ``x``'s dtype when it differs (a float32 codebook under autocast);
    ``indices`` has shape ``x.shape[:-1]``.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number, got {type(beta).__name__}")
    flat, codebook = _flatten(x, codebook)
    beta = float(beta)
    if torch.is_grad_enabled() and (x.requires_grad or codebook.requires_grad):
        quantized, indices, loss = _VectorQuantize.apply(flat, codebook, beta)
    else:
        quantized, indices, loss = _vector_quantize(flat, codebook, beta)
    return quantized.reshape(x.shape), indices.reshape(x.shape[:-1]), loss
