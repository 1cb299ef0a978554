"""Gaussian column layers: the reparameterized sample and the Gaussian KL."""
from torch import nn

from .. import ops
from ..ops._common import check_reduction


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
        check_reduction(reduction)
        self.reduction, self.beta = reduction, beta

    def forward(self, mu, logvar, prior_mu=None, prior_logvar=None):
        kl = ops.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction=self.reduction)
        return kl if self.beta == 1.0 else self.beta * kl

    def extra_repr(self):
        return f"reduction={self.reduction!r}, beta={self.beta}"
