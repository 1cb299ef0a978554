"""VQ column: residual_quantize (residual VQ of SoundStream / EnCodec), R stages in one op."""
import torch

from .. import reference
from ._common import OpFunction, apply, check_float, check_real, define, needs_autograd

_residual_quantize = define(
    "residual_quantize(Tensor x, Tensor codebooks, float beta) -> (Tensor, Tensor, Tensor)",
    lambda x, codebooks, beta: (x.new_empty(x.shape), x.new_empty((x.shape[0], codebooks.shape[0]), dtype=torch.int64),
                                x.new_empty((codebooks.shape[0],))))
_residual_quantize_backward = define(
    "residual_quantize_backward(Tensor grad_quantized, Tensor grad_losses, Tensor x, Tensor codebooks, "
    "Tensor indices, float beta, bool codebook_grad) -> (Tensor, Tensor)",
    lambda grad_quantized, grad_losses, x, codebooks, indices, beta, codebook_grad: (
        x.new_empty(x.shape), codebooks.new_empty(codebooks.shape)),
    reference.residual_quantize_backward)
_residual_segment_sums = define(
    "residual_segment_sums(Tensor x, Tensor codebooks, Tensor indices) -> (Tensor, Tensor)",
    lambda x, codebooks, indices: (
        x.new_empty(codebooks.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32),
        indices.new_empty(codebooks.shape[:2])))


# As vector_quantize's: the backward is linear in x and the codebooks given the saved indices.
class _ResidualQuantize(OpFunction):
    @staticmethod
    def forward(x, codebooks, beta):
        return _residual_quantize(x, codebooks, beta)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        x, codebooks, ctx.beta = inputs
        ctx.save_for_backward(x, codebooks, outputs[1])
        ctx.mark_non_differentiable(outputs[1])

    @staticmethod
    def backward(ctx, grad_quantized, grad_indices, grad_losses):
        x, codebooks, indices = ctx.saved_tensors
        codebook_grad = ctx.needs_input_grad[1]  # an EMA layer's codebooks take none: skip that pass
        grad_x, grad_codebooks = _residual_quantize_backward(grad_quantized.contiguous(), grad_losses, x, codebooks,
                                                             indices, ctx.beta, codebook_grad)
        return grad_x, grad_codebooks if codebook_grad else None, None


def residual_quantize(x, codebooks, *, beta=0.25):
    """Residual vector quantization: ``(quantized, indices, losses)``.

    ``codebooks`` ``(R, K, D)``; stage ``r`` quantizes the residual ``res_r = x - (codes of
    stages < r)`` with ``codebooks[r]`` (nearest code, ties to the lowest index).
    ``quantized`` (shape of ``x``) is the sum of the R chosen codes and passes its gradient
    straight through to ``x``; ``indices`` is ``x.shape[:-1] + (R,)``; ``losses`` ``(R,)``
    holds stage ``r``'s ``mse(code, sg(res_r)) + beta * mse(res_r, sg(code))``, whose
    gradients reach ``codebooks[r]`` (first term) and ``x`` (second; earlier stages' codes
    are constants in ``res_r``, as in vector-quantize-pytorch's ``ResidualVQ``).
    ``codebooks`` is cast to ``x``'s dtype when it differs. The native backend runs all
    stages in one call, keeping each row block's residual in cache between stages.
    """
    check_float("x", x)
    check_float("codebooks", codebooks)
    beta = check_real("beta", beta, minimum=0.0)
    if codebooks.device != x.device:
        raise ValueError(f"codebooks is on {codebooks.device} but x is on {x.device}")
    if codebooks.dim() != 3 or codebooks.shape[0] == 0 or codebooks.shape[1] == 0:
        raise ValueError(f"codebooks must be (R, K, D) with R, K >= 1, got shape {tuple(codebooks.shape)}")
    if x.dim() == 0 or x.shape[-1] != codebooks.shape[2]:
        raise ValueError(f"x's last dimension ({x.shape[-1] if x.dim() else 'none'}) must equal the codebooks' "
                         f"dim ({codebooks.shape[2]})")
    flat, codebooks = x.reshape(-1, x.shape[-1]), codebooks.to(x.dtype)
    if needs_autograd(x, codebooks):
        quantized, indices, losses = apply(_ResidualQuantize, flat, codebooks, beta)
    else:
        quantized, indices, losses = _residual_quantize(flat, codebooks, beta)
    return quantized.reshape(x.shape), indices.reshape(x.shape[:-1] + (codebooks.shape[0],)), losses


def residual_segment_sums(x, codebooks, indices):
    """``(sums, counts)``: for each stage ``r`` and code ``c``, the sum of the stage inputs
    ``res_r = x - sum_{j<r} codebooks[j][indices[:, j]]`` over the rows of ``x`` ``(N, D)``
    with ``indices[:, r] == c`` (``sums`` ``(R, K, D)``, float32, float64 for float64 ``x``)
    and their number (``counts`` ``(R, K)``, int64): a residual quantizer's EMA statistics in
    one pass, the residuals never stored. Summed in an order fixed by the inputs, whatever the
    thread count (native: row order within row parts set by N, then the parts in order;
    Triton: row order)."""
    return _residual_segment_sums(x, codebooks.to(x.dtype), indices)
