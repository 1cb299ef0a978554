"""Gumbel column: gumbel_quantize, the Gumbel-Softmax sample over codes mixed with a
codebook in one op (taming's GumbelQuantize, DALL-E's dVAE), never writing the sample; and
gumbel_quantize_with_kl, the same with each row's KL to the uniform prior (the layer's loss)
from the same pass over the logits (private to fastvae.nn.GumbelQuantizer)."""
import torch

from .. import reference
from ._common import OpFunction, apply, check_flag, check_float, define, draw_seed, needs_autograd
from .gumbel import _check_logits, _tau_tensor


def _stats_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


_gumbel_quantize = define(
    "gumbel_quantize(Tensor logits, Tensor codebook, Tensor seed, Tensor tau, bool hard) -> (Tensor, Tensor, Tensor)",
    lambda logits, codebook, seed, tau, hard: (
        logits.new_empty((logits.shape[0], codebook.shape[1])),
        logits.new_empty(logits.shape[:1], dtype=torch.int64),
        logits.new_empty((logits.shape[0], 2), dtype=_stats_dtype(logits))))
_gumbel_quantize_backward = define(
    "gumbel_quantize_backward(Tensor grad_quantized, Tensor logits, Tensor codebook, Tensor seed, Tensor tau, "
    "Tensor stats, Tensor? indices) -> Tensor[]",
    lambda grad_quantized, logits, codebook, seed, tau, stats, indices: [
        logits.new_empty(logits.shape), codebook.new_empty(codebook.shape), tau.new_empty(tau.shape)],
    reference.gumbel_quantize_backward)

_gumbel_quantize_kl = define(
    "gumbel_quantize_kl(Tensor logits, Tensor codebook, Tensor seed, Tensor tau, bool hard) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    lambda logits, codebook, seed, tau, hard: (
        logits.new_empty((logits.shape[0], codebook.shape[1])),
        logits.new_empty(logits.shape[:1], dtype=torch.int64),
        logits.new_empty((logits.shape[0], 3), dtype=_stats_dtype(logits)),
        logits.new_empty(logits.shape[:1], dtype=_stats_dtype(logits))))
_gumbel_quantize_kl_backward = define(
    "gumbel_quantize_kl_backward(Tensor grad_quantized, Tensor grad_kl, Tensor logits, Tensor codebook, Tensor seed, "
    "Tensor tau, Tensor stats, Tensor kl, Tensor? indices) -> Tensor[]",
    lambda grad_quantized, grad_kl, logits, codebook, seed, tau, stats, kl, indices: [
        logits.new_empty(logits.shape), codebook.new_empty(codebook.shape), tau.new_empty(tau.shape)],
    reference.gumbel_quantize_kl_backward)


def _needed(ctx, grad_logits, grad_codebook, grad_tau):
    """The backward kernels' gradients as the inputs (logits, codebook, seed, tau, hard) take
    them: None where an input needs none."""
    needs = ctx.needs_input_grad
    return (grad_logits if needs[0] else None, grad_codebook if needs[1] else None, None,
            grad_tau if needs[3] else None, None)


class _GumbelQuantize(OpFunction):
    @staticmethod
    def forward(logits, codebook, seed, tau, hard):
        return _gumbel_quantize(logits, codebook, seed, tau, hard)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        logits, codebook, seed, tau, hard = inputs
        _, indices, stats = outputs
        # The per-row statistics and the seed rebuild the sample: it is never stored. The
        # indices are the hard forward's mixing weights (one-hot rows), which the codebook's
        # gradient needs.
        ctx.save_for_backward(logits, codebook, seed, tau, stats, indices if hard else None)
        ctx.mark_non_differentiable(indices, stats)

    @staticmethod
    def backward(ctx, grad_quantized, grad_indices, grad_stats):
        logits, codebook, seed, tau, stats, indices = ctx.saved_tensors
        return _needed(ctx, *_gumbel_quantize_backward(grad_quantized, logits, codebook, seed, tau, stats, indices))


class _GumbelQuantizeKL(OpFunction):
    @staticmethod
    def forward(logits, codebook, seed, tau, hard):
        return _gumbel_quantize_kl(logits, codebook, seed, tau, hard)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        logits, codebook, seed, tau, hard = inputs
        _, indices, stats, kl = outputs
        ctx.save_for_backward(logits, codebook, seed, tau, stats, kl, indices if hard else None)
        ctx.mark_non_differentiable(indices, stats)

    @staticmethod
    def backward(ctx, grad_quantized, grad_indices, grad_stats, grad_kl):
        logits, codebook, seed, tau, stats, kl, indices = ctx.saved_tensors
        return _needed(ctx, *_gumbel_quantize_kl_backward(grad_quantized, grad_kl, logits, codebook, seed, tau,
                                                          stats, kl, indices))


def gumbel_quantize(logits, codebook, tau=1.0, hard=False, dim=1, *, generator=None):
    """Codes mixed by a Gumbel-Softmax sample over ``dim``: ``(quantized, indices)``.

    ``y = softmax((logits + g) / tau)`` over the ``K`` classes along ``dim`` (the same noise
    ``g``, and so the same ``y``, as :func:`fastvae.gumbel_softmax` for the same seed);
    ``quantized = sum_k y_k * codebook[k]``, ``logits``' shape with ``dim`` of size ``D``
    (taming's ``einsum("b n h w, n d -> b d h w", y, codebook)`` for ``dim=1``).
    ``hard=True``: ``quantized = codebook[indices]`` in value with the soft sample's gradient
    (straight-through, as ``gumbel_softmax(hard=True) @ codebook``). ``indices``
    (``logits``' shape without ``dim``) is the argmax of ``logits + g`` (the sample's argmax).
    Gradients reach ``logits``, ``codebook`` and a tensor ``tau``. The ``(N, K)`` sample is
    never written: the kernels stream it tile by tile and rebuild it from the seed in backward.

    ``codebook``: ``(K, D)``, cast to ``logits``' dtype when it differs; ``tau``, ``hard``,
    ``generator`` and the NaN / ``-inf`` rules as :func:`fastvae.gumbel_softmax` (a row
    holding a NaN or ``+inf`` logit gives a NaN row, an all ``-inf`` row zeros).
    """
    rows, codebook, seed, tau, hard, restore = _quantize_arguments(logits, codebook, tau, hard, dim, generator)
    if needs_autograd(rows, codebook, tau):
        quantized, indices, _ = apply(_GumbelQuantize, rows, codebook, seed, tau, hard)
    else:
        quantized, indices, _ = _gumbel_quantize(rows, codebook, seed, tau, hard)
    return restore(quantized, indices)


def gumbel_quantize_with_kl(logits, codebook, tau=1.0, hard=False, *, generator=None):
    """:func:`gumbel_quantize` over the last dim of ``logits`` ``(N, K)``, with each row's
    ``KL(softmax(logits) || uniform)``: ``(quantized, indices, kl)``, ``kl`` ``(N,)`` in
    float32 (float64 for float64 logits), as ``categorical_kl(logits, reduction="none")``.

    One pass over each row gives both (the KL's gradient is added to the logits' in the
    same backward pass), where the two ops would read the ``(N, K)`` logits twice forward
    and backward and sum two ``(N, K)`` gradients. Differentiable in ``kl`` too.
    """
    rows, codebook, seed, tau, hard, restore = _quantize_arguments(logits, codebook, tau, hard, -1, generator)
    if needs_autograd(rows, codebook, tau):
        quantized, indices, _, kl = apply(_GumbelQuantizeKL, rows, codebook, seed, tau, hard)
    else:
        quantized, indices, _, kl = _gumbel_quantize_kl(rows, codebook, seed, tau, hard)
    return *restore(quantized, indices), kl


def _quantize_arguments(logits, codebook, tau, hard, dim, generator):
    """The checked arguments of the quantize ops: ``(rows (N, K), codebook, seed, tau, hard,
    restore)``, ``restore(quantized, indices)`` giving them ``logits``' layout."""
    dim = _check_logits(logits, dim)
    check_float("codebook", codebook)
    if codebook.device != logits.device:
        raise ValueError(f"codebook is on {codebook.device} but logits is on {logits.device}")
    num_classes = logits.shape[dim]
    if codebook.dim() != 2 or codebook.shape[0] != num_classes:
        raise ValueError(f"codebook must be (num_codes, dim) with num_codes = logits.shape[{dim}] = {num_classes}, "
                         f"got shape {tuple(codebook.shape)}")
    codebook = codebook.to(logits.dtype)
    tau = _tau_tensor(tau, logits)
    hard = check_flag("hard", hard)
    seed = draw_seed(logits.device, generator)
    moved = logits.movedim(dim, -1)

    def restore(quantized, indices):
        quantized = quantized.reshape(moved.shape[:-1] + codebook.shape[1:]).movedim(-1, dim)
        return quantized, indices.reshape(moved.shape[:-1])

    return moved.reshape(-1, num_classes), codebook, seed, tau, hard, restore
