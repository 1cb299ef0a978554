"""``torch.nn`` layers over the functional ops: drop-in modules for VAE-family models."""
import torch
from torch import nn

from . import ops
from .ops._common import check_reduction


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


class GumbelSoftmax(nn.Module):
    """Gumbel-Softmax sample over ``dim`` (straight-through one-hot when ``hard``).

    ``tau`` is a plain attribute so that annealing schedules can set it between steps.
    """

    def __init__(self, tau=1.0, hard=False, dim=-1):
        super().__init__()
        self.tau, self.hard, self.dim = tau, hard, dim

    def forward(self, logits):
        return ops.gumbel_softmax(logits, self.tau, self.hard, dim=self.dim)

    def extra_repr(self):
        return f"tau={self.tau}, hard={self.hard}, dim={self.dim}"


class VectorQuantizer(nn.Module):
    """VQ-VAE quantizer with a learned codebook of ``num_codes`` vectors of size ``dim``.

    ``forward(x)`` returns ``(quantized, indices, loss)`` as
    :func:`fastvae.vector_quantize`: ``quantized`` carries the straight-through gradient,
    ``loss`` is the codebook loss plus ``beta`` times the commitment loss.

    ``channel_dim``: the dimension of ``x`` holding the ``dim`` features; ``-1``
    (default) for ``(..., D)`` input, ``1`` for channel-first ``(B, D, H, W)`` feature
    maps (``quantized`` then has ``x``'s layout and ``indices`` is ``(B, H, W)``).
    """

    def __init__(self, num_codes, dim, beta=0.25, channel_dim=-1, device=None, dtype=None):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be positive, got {num_codes} and {dim}")
        self.num_codes, self.dim, self.beta, self.channel_dim = num_codes, dim, beta, channel_dim
        self.codebook = nn.Parameter(torch.empty(num_codes, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        # As the original VQ-VAE: uniform in +-1/K.
        nn.init.uniform_(self.codebook, -1.0 / self.num_codes, 1.0 / self.num_codes)

    def forward(self, x):
        channel_last = self.channel_dim in (-1, x.dim() - 1)
        if not channel_last:
            x = x.movedim(self.channel_dim, -1)
        quantized, indices, loss = ops.vector_quantize(x, self.codebook.to(x.dtype), beta=self.beta)
        if not channel_last:
            quantized = quantized.movedim(-1, self.channel_dim)
        return quantized, indices, loss

    def extra_repr(self):
        return f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, channel_dim={self.channel_dim}"
