"""Gumbel column: gumbel_softmax (soft and straight-through hard) and categorical_kl."""
import torch

from .. import reference
from ._common import (OpFunction, apply, check_dim, check_flag, check_float, check_real, check_reduction, define,
                      draw_seed, native_eager, needs_autograd)


def _categorical_kl_fake(logits, prior_logits, dim, reduction):
    if reduction != "none":
        return logits.new_empty(())
    return logits.new_empty(logits.shape[:dim] + logits.shape[dim + 1:])


# tau is a one-element tensor on the logits' device (float64 for float64 logits, else
# float32) that the kernels read from memory: a learned or annealed temperature costs no
# host sync and no recompilation.
_gumbel_softmax = define("gumbel_softmax(Tensor logits, Tensor seed, Tensor tau, bool hard, int dim) -> Tensor",
                         lambda logits, seed, tau, hard, dim: logits.new_empty(logits.shape))
_gumbel_softmax_backward = define(
    "gumbel_softmax_backward(Tensor grad_y, Tensor logits, Tensor seed, Tensor tau, int dim) -> Tensor",
    lambda grad_y, logits, seed, tau, dim: logits.new_empty(logits.shape), reference.gumbel_softmax_backward)
_gumbel_softmax_backward_from_sample = define(
    "gumbel_softmax_backward_from_sample(Tensor grad_y, Tensor y, Tensor tau, int dim) -> Tensor",
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
        logits, seed, tau, ctx.hard, ctx.dim = inputs
        if ctx.hard:
            # A one-hot output cannot give the soft sample back: keep what regenerates it.
            ctx.save_for_backward(logits, seed, tau)
        else:
            # The output is the soft sample, so backward is a plain softmax backward from it:
            # no noise to regenerate, no exp, and nothing stored beyond the output itself.
            # (Differentiating that backward goes through y back into this Function.)
            ctx.save_for_backward(y, tau)

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.hard:
            logits, seed, tau = ctx.saved_tensors
            grad = _gumbel_softmax_backward(grad_y, logits, seed, tau, ctx.dim)
        else:
            y, tau = ctx.saved_tensors
            grad = _gumbel_softmax_backward_from_sample(grad_y, y, tau, ctx.dim)
        grad_tau = None
        if ctx.needs_input_grad[2]:
            soft = _gumbel_softmax(logits, seed, tau, False, ctx.dim) if ctx.hard else y
            grad_tau = _tau_gradient(grad, soft, tau)
        return grad, None, grad_tau, None, None


def _tau_gradient(grad_logits, y, tau):
    """d loss / d tau from the logits' gradient and the soft sample y = softmax(s),
    s = (logits + g) / tau: d y / d tau = -(y / tau)(s - sum(y s)), so the gradient is
    -sum(grad_logits * s); each row of grad_logits sums to 0, so s may be replaced by
    log y = s - logsumexp(s) (0 where y = 0: masked classes have no gradient)."""
    ct = tau.dtype
    log_y = torch.where(y > 0, torch.log(y.to(ct)), torch.zeros((), dtype=ct, device=y.device))
    return -(grad_logits.to(ct) * log_y).sum().reshape(tau.shape)


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
    ``tau`` may also be a one-element floating-point tensor on the logits' device (a learned
    temperature: one that requires grad receives its gradient; the kernels read it from
    memory, so there is no host sync, and its value is not checked, which would be one).
    ``hard``: a bool, NumPy bool or int.
    """
    eager = native_eager("gumbel_softmax", logits)
    if eager is not None and (y := eager(logits, tau, hard, dim, generator)) is not None:
        return y
    dim = _check_logits(logits, dim)
    tau = _tau_tensor(tau, logits)
    hard = check_flag("hard", hard)
    seed = draw_seed(logits.device, generator)
    if needs_autograd(logits, tau):
        return apply(_GumbelSoftmax, logits, seed, tau, hard, dim)
    return _gumbel_softmax(logits, seed, tau, hard, dim)


_TAU_CACHE = {}  # (value, device, dtype) -> its tensor, reused by calls with a constant tau
_TAU_CACHE_SIZE = 64


def _tau_tensor(tau, logits):
    """tau as the one-element tensor the kernels read (see the op schemas above). A tensor
    tau keeps its autograd history; its value is not checked (that would be a host sync)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if isinstance(tau, torch.Tensor):
        if not tau.is_floating_point():
            raise TypeError(f"tau must be a number or a floating-point tensor, got a {tau.dtype} tensor; "
                            "pass tau.float()")
        if tau.numel() != 1:
            raise ValueError(f"tau as a tensor must have one element, got shape {tuple(tau.shape)}")
        if tau.device != logits.device:
            raise ValueError(f"tau is on {tau.device} but logits is on {logits.device}; put tau on the logits' device")
        return tau.reshape(1).to(dtype)
    # A tau past the dtype's range is as good as its largest value: the sample is uniform.
    tau = min(check_real("tau", tau, minimum=0.0, inclusive=False), torch.finfo(dtype).max)
    # Under compilation or a dispatch mode (fake tensors) the tensor must be made in that mode.
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return torch.full((1,), float(tau), dtype=dtype, device=logits.device)
    key = (float(tau), logits.device, dtype)
    cached = _TAU_CACHE.get(key)
    if cached is None:
        if len(_TAU_CACHE) >= _TAU_CACHE_SIZE:  # an annealing schedule: a new value every step
            _TAU_CACHE.clear()
        cached = _TAU_CACHE[key] = torch.full((1,), float(tau), dtype=dtype, device=logits.device)
    return cached


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
