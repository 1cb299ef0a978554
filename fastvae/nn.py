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
    """VQ-VAE quantizer with a codebook of ``num_codes`` vectors of size ``dim``.

    ``forward(x)`` returns ``(quantized, indices, loss)`` as :func:`fastvae.vector_quantize`:
    ``quantized`` carries the straight-through gradient to ``x``.

    * ``ema_decay=None`` (default): the codebook is a parameter trained by gradient;
      ``loss = mse(e, sg(x)) + beta * mse(x, sg(e))``.
    * ``ema_decay`` a float in (0, 1): the codebook is a buffer updated by exponential
      moving averages (VQ-VAE appendix / Sonnet ``VectorQuantizerEMA``), in training mode
      only, after the assignment: ``N_k <- d N_k + (1 - d) n_k`` (codes' counts),
      ``m_k <- d m_k + (1 - d) sum of the x assigned to k``, Laplace smoothing
      ``N_k' = (N_k + eps) / (n + K eps) * n`` with ``n = sum N_k``, then
      ``e_k = m_k / N_k'``. ``loss`` is then the commitment term ``beta * mse(x, sg(e))``
      only. The averages start as one pseudo-assignment of each code to its own initial
      value, so a code that is not chosen stays where it is (rather than jumping to
      ``m_k / eps``) until its count decays to the order of ``eps``; from then on the
      smoothing pulls it toward the origin, as in Sonnet (``dead_code_threshold``
      restarts such codes).

    Dead codes: with ``dead_code_threshold`` > 0 (as ``threshold_ema_dead_code`` of
    vector-quantize-pytorch), a code whose running usage ``ema_count`` (the exponential
    moving average of its assignments per call, decay ``ema_decay`` or 0.99) has fallen
    below the threshold is restarted at the start of a training call: it becomes a vector
    of that call's input drawn at random (PyTorch's default generator), and its running
    usage is set to the threshold (in EMA mode its running sum to match), so it has a few
    calls to win inputs before it is restarted again.

    Usage statistics: ``perplexity`` (tensor, set by every call) is ``exp`` of the entropy
    of the codes' frequencies in that call (``num_codes`` when all are used evenly, 1 when
    one code takes everything); the buffer ``usage_count`` accumulates how often each code
    was chosen in training mode (``reset_usage()`` clears it), e.g. to find dead codes.

    ``channel_dim``: the dimension of ``x`` holding the ``dim`` features; ``-1``
    (default) for ``(..., D)`` input, ``1`` for channel-first ``(B, D, H, W)`` feature
    maps (``quantized`` then has ``x``'s layout and ``indices`` is ``(B, H, W)``).
    """

    def __init__(self, num_codes, dim, beta=0.25, channel_dim=-1, ema_decay=None, ema_eps=1e-5,
                 dead_code_threshold=0.0, device=None, dtype=None):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be positive, got {num_codes} and {dim}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be None or in (0, 1), got {ema_decay}")
        if not dead_code_threshold >= 0.0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold}")
        self.num_codes, self.dim, self.beta, self.channel_dim = num_codes, dim, beta, channel_dim
        self.ema_decay, self.ema_eps, self.dead_code_threshold = ema_decay, ema_eps, dead_code_threshold
        factory = {"device": device, "dtype": dtype}
        if ema_decay is None:
            self.codebook = nn.Parameter(torch.empty(num_codes, dim, **factory))
        else:
            self.register_buffer("codebook", torch.empty(num_codes, dim, **factory))
            self.register_buffer("ema_sum", torch.empty(num_codes, dim, device=device, dtype=torch.float32))
        if ema_decay is not None or dead_code_threshold > 0:
            self.register_buffer("ema_count", torch.empty(num_codes, device=device, dtype=torch.float32))
        self.register_buffer("usage_count", torch.zeros(num_codes, device=device, dtype=torch.int64))
        self.perplexity = None
        self.reset_parameters()

    def reset_parameters(self):
        # As the original VQ-VAE: uniform in +-1/K.
        with torch.no_grad():
            nn.init.uniform_(self.codebook, -1.0 / self.num_codes, 1.0 / self.num_codes)
            if self.ema_decay is not None or self.dead_code_threshold > 0:
                self.ema_count.fill_(1.0)
            if self.ema_decay is not None:
                self.ema_sum.copy_(self.codebook)

    def reset_usage(self):
        self.usage_count.zero_()

    def forward(self, x):
        channel_last = self.channel_dim in (-1, x.dim() - 1)
        if not channel_last:
            x = x.movedim(self.channel_dim, -1)
        if self.training and self.dead_code_threshold > 0:
            self._restart_dead_codes(x.detach().reshape(-1, self.dim))
        codebook = self.codebook  # the op casts it to x's dtype (a float32 codebook under autocast)
        if self.ema_decay is not None and self.training:
            codebook = codebook.clone()  # autograd keeps it for backward; the EMA update rewrites the buffer
        quantized, indices, loss = ops.vector_quantize(x, codebook, beta=self.beta)
        if self.ema_decay is not None:
            # The op's loss is (1 + beta) * mse with gradient only through the commitment term
            # (the codebook buffer takes none): subtracting the detached mse leaves beta * mse
            # with that same gradient, without another pass over x.
            loss = loss - loss.detach() / (1.0 + self.beta)
        with torch.no_grad():
            flat_indices = indices.reshape(-1)  # scatter_add_, not bincount: no host sync on CUDA
            counts = flat_indices.new_zeros(self.num_codes).scatter_add_(0, flat_indices, torch.ones_like(flat_indices))
            probs = counts.float() / max(indices.numel(), 1)
            self.perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum())
            if self.training:
                self.usage_count += counts
                if self.ema_decay is not None:
                    self._ema_update(x.detach().reshape(-1, self.dim), indices.reshape(-1), counts)
                elif self.dead_code_threshold > 0:
                    self.ema_count.mul_(0.99).add_(counts.float(), alpha=0.01)
        if not channel_last:
            quantized = quantized.movedim(-1, self.channel_dim)
        return quantized, indices, loss

    def _ema_update(self, flat_x, indices, counts):
        decay = self.ema_decay
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat_x.float())
        self.ema_count.mul_(decay).add_(counts.float(), alpha=1.0 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.ema_eps) / (total + self.num_codes * self.ema_eps) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, flat_x):
        # Before the call's search, so autograd never sees the codebook change under it. Every
        # code draws a candidate and only the dead ones take it: no host sync on the dead count.
        if flat_x.shape[0] == 0:
            return
        dead = (self.ema_count < self.dead_code_threshold)[:, None]
        picked = flat_x[torch.randint(flat_x.shape[0], (self.num_codes,), device=flat_x.device)]
        self.codebook.copy_(torch.where(dead, picked.to(self.codebook.dtype), self.codebook))
        self.ema_count.copy_(torch.where(dead[:, 0], self.dead_code_threshold, self.ema_count))
        if self.ema_decay is not None:
            self.ema_sum.copy_(torch.where(dead, picked.float() * self.dead_code_threshold, self.ema_sum))

    def extra_repr(self):
        ema = "" if self.ema_decay is None else f", ema_decay={self.ema_decay}, ema_eps={self.ema_eps}"
        dead = f", dead_code_threshold={self.dead_code_threshold}" if self.dead_code_threshold > 0 else ""
        return (f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, "
                f"channel_dim={self.channel_dim}{ema}{dead}")
