"""VQ column: nearest_code (exhaustive nearest-codebook search) and vector_quantize."""
import torch

from .. import reference
from ._common import OpFunction, apply, check_float, check_real, define, native_eager, needs_autograd

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
                                                                    codebook.new_empty(codebook.shape)),
    reference.vector_quantize_backward)
_vector_quantize_rotation_backward = define(
    "vector_quantize_rotation_backward(Tensor grad_quantized, Tensor grad_loss, Tensor x, Tensor codebook, "
    "Tensor indices, float beta) -> (Tensor, Tensor)",
    lambda grad_quantized, grad_loss, x, codebook, indices, beta: (x.new_empty(x.shape),
                                                                    codebook.new_empty(codebook.shape)),
    reference.vector_quantize_rotation_backward)
ESTIMATORS = ("ste", "rotation")


# The backward is linear in x and the codebook given the saved indices: its formula
# (create_graph=True, see define) has second derivatives through the indices of 0.
class _VectorQuantize(OpFunction):
    @staticmethod
    def forward(x, codebook, beta, estimator):
        return _vector_quantize(x, codebook, beta)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        x, codebook, ctx.beta, ctx.estimator = inputs
        _, indices, _ = outputs
        ctx.save_for_backward(x, codebook, indices)
        ctx.mark_non_differentiable(indices)

    @staticmethod
    def backward(ctx, grad_quantized, grad_indices, grad_loss):
        x, codebook, indices = ctx.saved_tensors
        backward = _vector_quantize_rotation_backward if ctx.estimator == "rotation" else _vector_quantize_backward
        grad_x, grad_codebook = backward(grad_quantized, grad_loss, x, codebook, indices, ctx.beta)
        return grad_x, grad_codebook, None, None


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
    if codebook.shape[1] == 0:
        raise ValueError("x and codebook have 0 features (last dimension 0); quantize vectors of at least one")
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


def vector_quantize(x, codebook, *, beta=0.25, estimator="ste"):
    """VQ-VAE quantization: ``(quantized, indices, loss)``.

    ``quantized`` equals ``codebook[indices]`` in value and passes its gradient straight
    through to ``x`` (``x + sg(codebook[indices] - x)``); ``loss = mse(codebook[indices],
    sg(x)) + beta * mse(x, sg(codebook[indices]))``, whose gradients reach ``codebook``
    (codebook term) and ``x`` (commitment term). ``x``: ``(..., D)``; ``codebook``:
    ``(K, D)``, cast to ``x``'s dtype when it differs (a float32 codebook under autocast);
    ``indices`` has shape ``x.shape[:-1]``; ``beta``: a finite number >= 0.

    ``estimator`` chooses the gradient that ``quantized`` passes to ``x``: ``"ste"`` (the
    straight-through copy) or ``"rotation"``, the rotation trick (Fifty et al. 2024,
    vector-quantize-pytorch's default): ``quantized`` is seen as ``x`` rotated onto the code
    and rescaled, ``|e|/|x| (x - 2 (x.w) w + 2 (x.u) q)`` with ``u = x/|x|``, ``q = e/|e|``,
    ``w = (u + q)/|u + q|`` held constant, so ``x`` receives ``|e|/|x| (g - 2 w (w.g) + 2 u (q.g))``
    (``g`` itself where ``x = 0``), computed per row inside the backward kernel. Values are
    the same for both.
    """
    eager = native_eager("vector_quantize", x)
    if eager is not None and (outputs := eager(x, codebook, beta, estimator)) is not None:
        return outputs
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {estimator!r}")
    beta = check_real("beta", beta, minimum=0.0)
    flat, codebook = _flatten(x, codebook)
    if needs_autograd(x, codebook):
        quantized, indices, loss = apply(_VectorQuantize, flat, codebook, beta, estimator)
    else:
        quantized, indices, loss = _vector_quantize(flat, codebook, beta)
    return quantized.reshape(x.shape), indices.reshape(x.shape[:-1]), loss
