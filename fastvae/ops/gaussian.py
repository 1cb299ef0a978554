"""Gaussian column: reparameterize, gaussian_kl and the fused reparameterize_kl."""
import torch

from .. import reference
from ._common import (REDUCTIONS, OpFunction, apply, check_float, check_like, check_reduction, define, draw_seed,
                      native_eager, needs_autograd)

# "per_sample": one KL per sample, the sum over every dimension but the first (the
# latent-diffusion / diffusers posterior's kl()).
GAUSSIAN_REDUCTIONS = REDUCTIONS + ("per_sample",)


def _like(t):
    return t.new_empty(t.shape)


def _kl_out(mu, reduction):
    if reduction == "per_sample":
        return mu.new_empty(mu.shape[:1])
    return mu.new_empty(mu.shape if reduction == "none" else ())


_reparameterize = define("reparameterize(Tensor mu, Tensor logvar, Tensor seed) -> Tensor",
                         lambda mu, logvar, seed: _like(mu))
_reparameterize_backward = define(
    "reparameterize_backward(Tensor grad_z, Tensor mu, Tensor logvar, Tensor z, Tensor seed, bool dense_grad_mu) "
    "-> Tensor[]",
    lambda grad_z, mu, logvar, z, seed, dense_grad_mu: [_like(mu), _like(logvar)] if dense_grad_mu else [_like(logvar)],
    reference.reparameterize_backward)
_gaussian_kl = define(
    "gaussian_kl(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, str reduction) -> Tensor",
    lambda mu, logvar, prior_mu, prior_logvar, reduction: _kl_out(mu, reduction))
_gaussian_kl_backward = define(
    "gaussian_kl_backward(Tensor grad, Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, "
    "str reduction) -> Tensor[]",
    lambda grad, mu, logvar, prior_mu, prior_logvar, reduction:
        [_like(mu) for _ in range(2 if prior_mu is None and prior_logvar is None else 4)],
    reference.gaussian_kl_backward)
_reparameterize_kl = define(
    "reparameterize_kl(Tensor mu, Tensor logvar, Tensor seed, str reduction) -> (Tensor, Tensor)",
    lambda mu, logvar, seed, reduction: (_like(mu), _kl_out(mu, reduction)))
_reparameterize_kl_backward = define(
    "reparameterize_kl_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, Tensor z, Tensor seed, "
    "str reduction) -> Tensor[]",
    lambda grad_z, grad_kl, mu, logvar, z, seed, reduction: [_like(mu), _like(mu)],
    reference.reparameterize_kl_backward)


# The sampling Functions save their output z: a backend may recover std * eps = z - mu
# from it instead of regenerating the noise (see reference.reparameterize_backward). As
# with torch.exp, modifying z in place before backward is then an error.
class _Reparameterize(OpFunction):
    @staticmethod
    def forward(mu, logvar, seed):
        return _reparameterize(mu, logvar, seed)

    @staticmethod
    def setup_context(ctx, inputs, z):
        mu, logvar, seed = inputs
        ctx.save_for_backward(mu, logvar, z, seed)

    @staticmethod
    def backward(ctx, grad_z):
        if not ctx.needs_input_grad[1]:
            return grad_z, None, None
        mu, logvar, z, seed = ctx.saved_tensors
        # mu's gradient is grad_z. One that is not contiguous (sum()'s expanded gradient)
        # would be copied by autograd in a pass of its own: the kernel writes it instead.
        dense_grad_mu = ctx.needs_input_grad[0] and not grad_z.is_contiguous()
        grads = _reparameterize_backward(grad_z, mu, logvar, z, seed, dense_grad_mu)
        return grads[0] if dense_grad_mu else grad_z, grads[-1], None


class _GaussianKL(OpFunction):
    @staticmethod
    def forward(mu, logvar, prior_mu, prior_logvar, reduction):
        return _gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction)

    @staticmethod
    def setup_context(ctx, inputs, kl):
        mu, logvar, prior_mu, prior_logvar, ctx.reduction = inputs
        ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar)

    @staticmethod
    def backward(ctx, grad):
        mu, logvar, prior_mu, prior_logvar = ctx.saved_tensors
        grads = _gaussian_kl_backward(grad, mu, logvar, prior_mu, prior_logvar, ctx.reduction)
        g_prior_mu = g_prior_logvar = None
        if prior_mu is not None and ctx.needs_input_grad[2]:
            g_prior_mu = grads[2].sum_to_size(prior_mu.shape)
        if prior_logvar is not None and ctx.needs_input_grad[3]:
            g_prior_logvar = grads[3].sum_to_size(prior_logvar.shape)
        return grads[0], grads[1], g_prior_mu, g_prior_logvar, None


class _ReparameterizeKL(OpFunction):
    @staticmethod
    def forward(mu, logvar, seed, reduction):
        return _reparameterize_kl(mu, logvar, seed, reduction)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        mu, logvar, seed, ctx.reduction = inputs
        ctx.save_for_backward(mu, logvar, outputs[0], seed)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        mu, logvar, z, seed = ctx.saved_tensors
        g_mu, g_logvar = _reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, z, seed, ctx.reduction)
        return g_mu, g_logvar, None, None


def _check_reduction(reduction, mu):
    check_reduction(reduction, GAUSSIAN_REDUCTIONS)
    if reduction == "per_sample" and mu.dim() == 0:
        raise ValueError("reduction='per_sample' sums over every dimension but the first: mu must have at least one")


def _check_pair(mu, logvar):
    check_float("mu", mu)
    check_like("logvar", logvar, "mu", mu)
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar has shape {tuple(logvar.shape)} but mu has {tuple(mu.shape)}; they must match")


def reparameterize(mu, logvar, *, generator=None):
    """Sample ``z = mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)``.

    Differentiable in ``mu`` and ``logvar``. The noise is made inside the kernel from a
    seed drawn from ``generator`` (PyTorch's default generator if None) and is never
    stored: backward regenerates it, or (native CPU kernel, float32) recovers
    ``std * eps`` as ``z - mu`` wherever that is exact to float32 rounding of ``std``.
    ``z`` is saved for backward, so modifying it in place before backward is an error
    (as for the output of ``torch.exp``). Returns ``z`` in ``mu``'s dtype and shape.
    """
    eager = native_eager("reparameterize", mu)
    if eager is not None and (z := eager(mu, logvar, generator)) is not None:
        return z
    _check_pair(mu, logvar)
    seed = draw_seed(mu.device, generator)
    if needs_autograd(mu, logvar):
        return apply(_Reparameterize, mu, logvar, seed)
    return _reparameterize(mu, logvar, seed)


def _check_prior(name, prior, mu):
    if prior is None:
        return None
    check_float(name, prior)
    if prior.device != mu.device:
        raise ValueError(f"{name} is on {prior.device} but mu is on {mu.device}")
    try:
        shape = torch.broadcast_shapes(prior.shape, mu.shape)
    except RuntimeError:
        shape = None
    if shape != mu.shape:
        raise ValueError(f"{name} of shape {tuple(prior.shape)} does not broadcast to mu's shape {tuple(mu.shape)}")
    return prior if prior.dtype == mu.dtype else prior.to(mu.dtype)


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, reduction="batchmean"):
    """``KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar)))``, diagonal Gaussians.

    The prior is N(0, I) where both prior arguments are None (a missing one means mean 0
    or log-variance 0); the priors broadcast against ``mu`` and receive gradients, as in
    hierarchical VAEs with a learned prior. ``reduction``: ``"none"`` (elementwise),
    ``"sum"``, ``"mean"`` (over all elements), ``"batchmean"`` (sum / ``mu.shape[0]``) or
    ``"per_sample"`` (shape ``(mu.shape[0],)``: the sum over every other dimension,
    computed without the elementwise tensor).
    Accumulates in float32; returns ``mu``'s dtype.
    """
    eager = native_eager("gaussian_kl", mu)
    if eager is not None and (kl := eager(mu, logvar, prior_mu, prior_logvar, reduction)) is not None:
        return kl
    _check_pair(mu, logvar)
    _check_reduction(reduction, mu)
    prior_mu = _check_prior("prior_mu", prior_mu, mu)
    prior_logvar = _check_prior("prior_logvar", prior_logvar, mu)
    if needs_autograd(mu, logvar, prior_mu, prior_logvar):
        return apply(_GaussianKL, mu, logvar, prior_mu, prior_logvar, reduction)
    return _gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction)


def reparameterize_kl(mu, logvar, *, reduction="batchmean", generator=None):
    """``(z, kl)`` from one pass over ``mu`` and ``logvar``: the sample of
    :func:`reparameterize` and the KL to N(0, I) of :func:`gaussian_kl`."""
    eager = native_eager("reparameterize_kl", mu)
    if eager is not None and (z_kl := eager(mu, logvar, reduction, generator)) is not None:
        return z_kl
    _check_pair(mu, logvar)
    _check_reduction(reduction, mu)
    seed = draw_seed(mu.device, generator)
    if needs_autograd(mu, logvar):
        return apply(_ReparameterizeKL, mu, logvar, seed, reduction)
    return _reparameterize_kl(mu, logvar, seed, reduction)
