"""The spec of gumbel_quantize (the fused Gumbel-Softmax sample mixed with a codebook),
part of the ``torch`` backend: ``fastvae.reference`` re-exports these functions.

``logits`` arrive as ``(N, K)`` rows (the op file moves ``dim`` last and flattens the rest,
as :func:`fastvae.gumbel_softmax` numbers its rows, so a seed gives the same noise and the
same sample ``y`` as there), ``codebook`` as ``(K, D)``. The spec materialises ``y``; the
kernels never write it.

``stats`` (``(N, 2)``, compute dtype) is what the kernels keep per row to rebuild ``y`` in
backward: ``m = max(logits + g)`` and ``log_sum = log sum exp((logits + g - m) / tau)``, so
``y = exp((logits + g - m) / tau - log_sum)``. This spec's backward recomputes ``y`` from
the seed and does not read them.

``gumbel_quantize_kl`` is ``gumbel_quantize`` with each row's ``KL(softmax(logits) || uniform)``
(GumbelQuantizer's loss, :func:`fastvae.categorical_kl` with ``reduction="none"``), which
the kernels take from the same pass over the row; its backward adds the KL's gradient to
the logits'. Its ``stats`` have a third column, ``lse = logsumexp(logits)`` (the kernels
rebuild ``log softmax(logits) = logits - lse`` from it).
"""
import math

import torch

from .reference import _categorical_terms, _gumbel_soft, categorical_kl_backward, compute_dtype, inverse_tau


def _row_stats(perturbed, tau):
    top = perturbed.amax(dim=-1, keepdim=True)
    centred = torch.where(top == -math.inf, -math.inf, perturbed - top)  # an all -inf row: log_sum = -inf
    log_sum = torch.logsumexp(centred * inverse_tau(tau, perturbed.dtype), dim=-1, keepdim=True)
    return torch.cat([top, log_sum], dim=1)


def gumbel_quantize(logits, codebook, seed, tau, hard):
    """``(quantized (N, D), indices (N,), stats (N, 2))``.

    Soft: ``quantized = y @ codebook``, ``y = softmax((logits + g) / tau)`` as
    :func:`fastvae.gumbel_softmax`. Hard: ``quantized = codebook[indices]`` (the
    straight-through forward value). ``indices = argmax(logits + g)`` (ties and NaN as
    :func:`torch.argmax`). A row holding a NaN or ``+inf`` logit gives a NaN row, an all
    ``-inf`` row (nothing to sample) zeros, soft and hard.
    """
    ct = compute_dtype(logits)
    y, perturbed = _gumbel_soft(logits, seed, tau)
    indices = perturbed.argmax(dim=-1)
    cb = codebook.to(ct)
    if hard:
        row_sum = y.sum(dim=-1, keepdim=True)  # 1, 0 (all -inf) or NaN, as the hard gumbel_softmax's row
        quantized = torch.where(row_sum > 0, cb[indices], row_sum)
    else:
        quantized = y @ cb
    return quantized.to(logits.dtype), indices, _row_stats(perturbed, tau)


def gumbel_quantize_backward(grad_quantized, logits, codebook, seed, tau, stats, indices):
    """``[grad_logits, grad_codebook, grad_tau]``: with ``d_y = grad_quantized @ codebook^T``,
    ``grad_logits = y (d_y - sum(y d_y)) / tau`` and ``grad_tau = -sum(grad_logits * log y)``
    (``tau``'s shape; terms with ``y = 0`` are 0), soft and hard (straight-through) alike;
    ``grad_codebook = w^T grad_quantized`` with ``w`` the forward's mixing weights: ``y``
    (soft, ``indices`` None) or the one-hot rows at ``indices`` (hard: the sum of
    ``grad_quantized`` over the rows that took each code; their derivatives are ``y``'s).

    Differentiable in every input (grad mode on: the ops' double backward runs this)."""
    ct = compute_dtype(logits)
    y, _ = _gumbel_soft(logits, seed, tau)
    cb, g = codebook.to(ct), grad_quantized.to(ct)
    d_y = g @ cb.t()
    grad_logits = y * (d_y - (y * d_y).sum(dim=-1, keepdim=True)) * inverse_tau(tau, ct)
    log_y = torch.where(y > 0, torch.log(torch.where(y > 0, y, 1.0)), 0.0)
    grad_tau = -(grad_logits * log_y).sum().reshape(tau.shape).to(tau.dtype)
    weights = y
    if indices is not None:
        # The hard sample as gumbel_softmax(hard=True) makes it: one-hot values carrying y's
        # derivatives (which a double backward differentiates).
        row_sum = y.detach().sum(dim=-1, keepdim=True)
        one_hot = torch.zeros_like(y).scatter_(-1, indices[:, None], 1.0)
        weights = torch.where(row_sum > 0, one_hot, row_sum) + (y - y.detach())
    grad_codebook = weights.t() @ g
    return [grad_logits.to(logits.dtype), grad_codebook.to(codebook.dtype), grad_tau]


def gumbel_quantize_kl(logits, codebook, seed, tau, hard):
    """``(quantized, indices, stats (N, 3), kl (N,))``: :func:`gumbel_quantize`'s outputs,
    ``stats`` with ``logsumexp(logits)`` appended, and ``kl`` each row's
    ``KL(softmax(logits) || uniform)`` (compute dtype; NaN for a row holding a NaN or ``+inf``,
    0 for an all ``-inf`` row)."""
    quantized, indices, stats = gumbel_quantize(logits, codebook, seed, tau, hard)
    ct = compute_dtype(logits)
    _, _, kl = _categorical_terms(logits, None)
    lse = torch.logsumexp(logits.to(ct), dim=-1, keepdim=True)
    return quantized, indices, torch.cat([stats, lse.to(stats.dtype)], dim=1), kl.to(ct)


def gumbel_quantize_kl_backward(grad_quantized, grad_kl, logits, codebook, seed, tau, stats, kl, indices):
    """:func:`gumbel_quantize_backward`'s gradients, the logits' plus the KL's:
    ``grad_kl * p (log p - sum(p log p))`` per row, ``p = softmax(logits)``."""
    grads = gumbel_quantize_backward(grad_quantized, logits, codebook, seed, tau, stats[:, :2], indices)
    ct = compute_dtype(logits)
    kl_grad = categorical_kl_backward(grad_kl.to(ct).expand(logits.shape[:1]), logits.to(ct), None, -1, "none")[0]
    grads[0] = (grads[0].to(ct) + kl_grad).to(logits.dtype)
    return grads
