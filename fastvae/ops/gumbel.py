"""Gumbel column: gumbel_softmax (soft and straight-through hard) and categorical_kl."""
import torch

from .. import reference
from ._common import (OpFunction, apply, check_dim, check_flag, check_float, check_real, check_reduction, define,
                      draw_seed, needs_autograd)


def _categorical_kl_fake(logits, prior_logits, dim, reduction):
    if reduction != "none":
        return logits.new_empty(())
    return logits.new_empty(logits.shape[:dim] + logits.shape[dim + 1:])


_gumbel_softmax = define("gumbel_softmax(Tensor logits, Tensor seed, float tau, bool hard, int dim) -> Tensor",
                         lambda logits, seed, tau, hard, dim: logits.new_empty(logits.shape))
_gumbel_softmax_backward = define(
    "gumbel_softmax_backward(Tensor grad_y, Tensor logits, Tensor seed, float tau, int dim) -> Tensor",
    lambda grad_y, logits, seed, tau, dim: logits.new_empty(logits.shape), reference.gumbel_softmax_backward)
_gumbel_softmax_backward_from_sample = define(
    "gumbel_softmax_backward_from_sample(Tensor grad_y, Tensor y, float tau, int dim) -> Tensor",
    lambda grad_y, y, tau, dim: y.new_empty(y.shape), reference.gumbel_softmax_backward_from_sample)
_categorical_kl = define("categorical_kl(Tensor logits, Tensor? prior_logits, int dim, str reduction) -> Tensor",
                         _categorical_kl_fake)
_categorical_kl_backward = define(
    "categorical_kl_backward(Tensor grad, Tensor logits, Tensor? prior_logits, int dim, str reduction) -> Tensor[]",
    lambda grad, logits, prior_logits, dim, reduction:
        [logits.new_empty(logits.shape) for _ in range(1 if prior_logits is None else 2)],
    reference.categorical_kl_backward)


class _GumbelSoftmax(OpFunction):
    @staticmethod
    def forward(logits, seed, tau, hard, dim):
        return _gumbel_softmax(logits, seed, tau, hard, dim)

    @staticmethod
    def setup_context(ctx, inputs, y):
        logits, seed, ctx.tau, ctx.hard, ctx.dim = inputs
        if ctx.hard:
            # A one-hot output cannot give the soft sample back: keep what regenerates it.
            ctx.save_for_backward(logits, seed)
        else:
            # The output is the soft sample, so backward is a plain softmax backward from it:
            # no noise to regenerate, no exp, and nothing stored beyond the output itself.
            # (Differentiating that backward goes through y back into this Function.)
            ctx.save_for_backward(y)

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.hard:
            logits, seed = ctx.saved_tensors
            grad = _gumbel_softmax_backward(grad_y, logits, seed, ctx.tau, ctx.dim)
        else:
            y, = ctx.saved_tensors
            grad = _gumbel_softmax_backward_from_sample(grad_y, y, ctx.tau, ctx.dim)
        return grad, None, None, None, None


class _CategoricalKL(OpFunction):
    @staticmethod
    def forward(logits, prior_logits, dim, reduction):
        return _categorical_kl(logits, prior_logits, dim, reduction)

    @staticmethod
    def setup_context(ctx, inputs, kl):
        logits, prior_logits, ctx.dim, ctx.reduction = inputs
        ctx.save_for_backward(logits, prior_logits)

    @staticmethod
    def backward(ctx, grad):
        logits, prior_logits = ctx.saved_tensors
        grads = _categorical_kl_backward(grad, logits, prior_logits, ctx.dim, ctx.reduction)
        g_prior = None
        if prior_logits is not None and ctx.needs_input_grad[1]:
            g_prior = grads[1].sum_to_size(prior_logits.shape)
        return grads[0], g_prior, None, None


def _check_logits(logits, dim):
    check_float("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the classes)")
    dim = check_dim("dim", dim, logits.dim())
    if logits.shape[dim] == 0:
        raise ValueError(f"logits has no classes: its size along dim={dim} is 0 (shape {tuple(logits.shape)}); "
                         "a categorical distribution needs at least one class")
    return dim


def gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1, *, generator=None):
    """Sample from the Gumbel-Softmax (Concrete) distribution over ``dim``.

    A drop-in for :func:`torch.nn.functional.gumbel_softmax` (``eps`` is accepted and
    unused, as there). ``y = softmax((logits + g) / tau)`` with Gumbel noise ``g`` made in
    the kernel and never stored. ``hard=True`` returns exact one-hot rows (the argmax of
    ``logits + g``, ties to the lowest index) carrying the soft sample's gradient
    (straight-through). ``-inf`` logits are masked classes: never sampled, probability
    exactly 0. A row whose logits are all ``-inf`` has nothing to sample and gives zeros
    (and zero gradient) rather than NaN. A row holding a NaN or ``+inf`` logit gives an
    all-NaN row, soft and hard, and a NaN gradient (NaN in, NaN out, as
    :func:`torch.nn.functional.gumbel_softmax`). Every finite ``tau > 0`` is computed:
    as ``tau`` shrinks the soft sample tends to the hard one-hot, which it equals once
    ``1 / tau`` passes float32's range (below about ``3e-39``); a huge ``tau`` gives the
    uniform distribution over the unmasked classes.
    ``tau``: a finite number > 0 (a Python or NumPy scalar, or a one-element floating-point
    tensor); ``hard``: a bool, NumPy bool or int.
    """
    dim = _check_logits(logits, dim)
    if isinstance(tau, torch.Tensor) and not tau.is_floating_point():
        raise TypeError(f"tau must be a number or a floating-point tensor, got a {tau.dtype} tensor; pass tau.float()")
    if isinstance(tau, torch.Tensor) and tau.numel() == 1:
        tau = tau.item()  # an annealed temperature kept in a tensor
    tau = check_real("tau", tau, minimum=0.0, inclusive=False)
    hard = check_flag("hard", hard)
    seed = draw_seed(logits.device, generator)
    if needs_autograd(logits):
        return apply(_GumbelSoftmax, logits, seed, tau, hard, dim)
    return _gumbel_softmax(logits, seed, tau, hard, dim)


def categorical_kl(logits, prior_logits=None, *, dim=-1, reduction="batchmean"):
    """``KL(softmax(logits) || prior)`` along ``dim``: the discrete-VAE (dVAE) ELBO term.

    The prior is uniform over the classes when ``prior_logits`` is None, else
    ``softmax(prior_logits)`` (broadcast against ``logits``, and differentiable).
    ``-inf`` logits are masked classes and contribute 0; a row whose logits are all
    ``-inf`` has KL 0. Mass on a class the prior masks gives ``+inf`` (so does a prior
    row that is all ``-inf``); a row whose logits or prior hold a NaN or ``+inf`` gives NaN,
    and the reductions carry it. ``reduction``: ``"none"`` (one
    KL per distribution: ``logits``' shape without ``dim``), ``"sum"``, ``"mean"`` (over
    distributions) or ``"batchmean"`` (sum / ``logits.shape[0]``).
    """
    dim = _check_logits(logits, dim)
    check_reduction(reduction)
    if prior_logits is not None:
        check_float("prior_logits", prior_logits)
        if prior_logits.device != logits.device:
            raise ValueError(f"prior_logits is on {prior_logits.device} but logits is on {logits.device}")
        try:
            broadcast = torch.broadcast_shapes(prior_logits.shape, logits.shape) == logits.shape
        except RuntimeError:
            broadcast = False
        if not broadcast:
            raise ValueError(f"prior_logits of shape {tuple(prior_logits.shape)} does not broadcast to logits' "
                             f"shape {tuple(logits.shape)}")
        prior_logits = prior_logits if prior_logits.dtype == logits.dtype else prior_logits.to(logits.dtype)
    if needs_autograd(logits, prior_logits):
        return apply(_CategoricalKL, logits, prior_logits, dim, reduction)
    return _categorical_kl(logits, prior_logits, dim, reduction)
