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
    "Tensor indices, float beta) -> (Tensor, Tensor)",
    lambda grad_quantized, grad_losses, x, codebooks, indices, beta: (x.new_empty(x.shape),
                                                                       codebooks.new_empty(codebooks.shape)),
    reference.residual_quantize_backward)


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
        grad_x, grad_codebooks = _residual_quantize_backward(grad_quantized.contiguous(), grad_losses, x, codebooks,
                                                             indices, ctx.beta)
        return grad_x, grad_codebooks, None


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
