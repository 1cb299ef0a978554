"""Gaussian column layers: the reparameterized sample, the Gaussian KL and the diagonal
Gaussian posterior of latent-diffusion autoencoders."""
import math

import torch
from torch import nn

from .. import ops
from ..ops._common import check_dim, check_float, check_reduction
from ..ops.gaussian import GAUSSIAN_REDUCTIONS


class Reparameterize(nn.Module):
    """``z = mu + exp(logvar / 2) * eps``: the reparameterized Gaussian sample.

    ``forward(mu, logvar)`` returns ``z``; in ``eval()`` mode it returns ``mu`` when
    ``sample_in_eval=False`` (the usual deterministic encoding at inference).
    """

    def __init__(self, sample_in_eval=True):
        super().__init__()
        self.sample_in_eval = sample_in_eval

    def forward(self, mu, logvar):
        if not self.training and not self.sample_in_eval:
            return mu
        return ops.reparameterize(mu, logvar)

    def extra_repr(self):
        return f"sample_in_eval={self.sample_in_eval}"


class GaussianKL(nn.Module):
    """``KL(N(mu, exp(logvar)) || prior)`` with a standard normal prior by default.

    ``forward(mu, logvar, prior_mu=None, prior_logvar=None)``; ``beta`` scales the
    result (beta-VAE).
    """

    def __init__(self, reduction="batchmean", beta=1.0):
        super().__init__()
        check_reduction(reduction, GAUSSIAN_REDUCTIONS)
        self.reduction, self.beta = reduction, beta

    def forward(self, mu, logvar, prior_mu=None, prior_logvar=None):
        kl = ops.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction=self.reduction)
        return kl if self.beta == 1.0 else self.beta * kl

    def extra_repr(self):
        return f"reduction={self.reduction!r}, beta={self.beta}"


class DiagonalGaussian:
    """The posterior ``N(mean, diag(exp(logvar)))`` of a latent-diffusion / diffusers
    autoencoder: a drop-in for their ``DiagonalGaussianDistribution``, on fused kernels.

    ``parameters`` holds the mean and the log-variance concatenated along ``dim`` (the
    encoder's output, ``(B, 2C, H, W)`` for ``dim=1``); the log-variance is clamped to
    [-30, 20] (gradient zero outside, as ``torch.clamp``). With ``deterministic=True`` the
    distribution is the point mass at ``mean``: ``std`` and ``var`` are zeros, ``sample()``
    returns the mean, ``kl()`` and ``nll()`` are zeros.

    * ``sample(generator=None)``: ``mean + std * eps`` by :func:`fastvae.reparameterize`
      (differentiable, the noise never stored); ``mode()``: ``mean``.
    * ``kl(other=None, reduction="per_sample")``: ``KL(self || other)`` (``other`` another
      ``DiagonalGaussian``; N(0, I) when None) by :func:`fastvae.gaussian_kl`.
    * ``nll(x, reduction="per_sample")``: ``0.5 * (log 2 pi + logvar + (x - mean)^2 / var)``.

    ``reduction``: ``"per_sample"`` (shape ``(B,)``, the sum over every dimension but the
    first: diffusers' ``dims=[1, 2, 3]`` for a 4-D latent), ``"none"``, ``"sum"``,
    ``"mean"`` or ``"batchmean"``. Deliberate differences from diffusers: ``per_sample``
    sums over every non-batch dimension (diffusers sums dims 1-3 only, which leaves the
    last dimension of a 5-D video latent unreduced); ``std`` and ``var`` are computed when
    read rather than eagerly (same values); a deterministic ``kl()``/``nll()`` is zeros of the
    reduction's shape on the parameters' device (diffusers: ``torch.Tensor([0.0])`` on CPU);
    ``generator`` is one ``torch.Generator`` (not a list of them).
    """

    def __init__(self, parameters, dim=1, deterministic=False):
        check_float("parameters", parameters)
        size = parameters.shape[check_dim("dim", dim, parameters.dim())]
        if size % 2 or not size:
            raise ValueError(f"parameters must hold the mean and the log-variance concatenated along dim={dim}: "
                             f"its size there must be even and > 0, got shape {tuple(parameters.shape)}")
        self.parameters = parameters
        self.dim = dim
        self.deterministic = deterministic
        mean, logvar = torch.chunk(parameters, 2, dim=dim)
        # A channel slice of (B, 2C, H, W) is not a (rows, cols) matrix the kernels read in
        # place: one copy here rather than one in every op that reads it.
        self.mean = mean.contiguous()
        self.logvar = torch.clamp(logvar, _LOGVAR_MIN, _LOGVAR_MAX)
        self._sampled_kl = None  # (the per-sample KL made with the last sample, its grad mode)

    @property
    def std(self):
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)

    @property
    def var(self):
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)

    def sample(self, generator=None):
        if self.deterministic:
            return self.mean.clone()
        # The per-sample KL comes out of the same pass (and its gradient out of the same
        # backward): kl() returns it rather than reading mean and logvar again.
        z, kl = ops.reparameterize_kl(self.mean, self.logvar, reduction="per_sample", generator=generator)
        self._sampled_kl = (kl, torch.is_grad_enabled())
        return z

    def mode(self):
        return self.mean

    def kl(self, other=None, reduction="per_sample"):
        check_reduction(reduction, GAUSSIAN_REDUCTIONS)
        if self.deterministic:
            return self._zeros(reduction)
        if other is None:
            if reduction == "per_sample" and self._sampled_kl is not None and \
                    self._sampled_kl[1] == torch.is_grad_enabled():
                return self._sampled_kl[0]
            return ops.gaussian_kl(self.mean, self.logvar, reduction=reduction)
        if not isinstance(other, DiagonalGaussian):
            raise TypeError(f"other must be a DiagonalGaussian or None, got {type(other).__name__}")
        return ops.gaussian_kl(self.mean, self.logvar, other.mean, other.logvar, reduction=reduction)

    def nll(self, sample, reduction="per_sample", *, dims=None):
        """Gaussian negative log-likelihood of ``sample``. diffusers' ``nll(sample, dims)``
        also works: ``dims`` (by keyword, or a list in ``reduction``'s place) sums over those
        dimensions instead of reducing."""
        if isinstance(reduction, (list, tuple)):
            reduction, dims = "per_sample", reduction
        check_reduction(reduction, GAUSSIAN_REDUCTIONS)
        if self.deterministic:
            return self._zeros(reduction) if dims is None else self.mean.new_zeros(
                [s for d, s in enumerate(self.mean.shape) if d not in {x % self.mean.dim() for x in dims}])
        nll = 0.5 * (_LOG_TWO_PI + self.logvar + (sample - self.mean) ** 2 / torch.exp(self.logvar))
        if dims is not None:
            return nll.sum(dim=list(dims))
        return _reduce(nll, reduction)

    def _zeros(self, reduction):
        shape = {"none": self.mean.shape, "per_sample": self.mean.shape[:1]}.get(reduction, ())
        return self.mean.new_zeros(shape)


_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0
_LOG_TWO_PI = math.log(2.0 * math.pi)


def _reduce(value, reduction):
    """``value`` (elementwise) reduced as :func:`fastvae.gaussian_kl` reduces the KL."""
    if reduction == "none":
        return value
    if reduction == "per_sample":
        return value if value.dim() == 1 else value.flatten(1).sum(dim=1)
    total = value.sum()
    return {"sum": total, "mean": total / max(value.numel(), 1), "batchmean": total / value.shape[0]}[reduction]
