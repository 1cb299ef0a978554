"""VQ column layers: the VQ-VAE quantizer (gradient or EMA codebook, dead-code restarts, usage statistics)."""
import torch
from torch import nn

from .. import ops
from ..ops._common import check_dim, check_float, check_real, check_size


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
      restarts such codes). ``ema_eps`` must be > 0: unsmoothed, a code whose count has
      decayed to 0 would become 0 / 0.

    ``beta`` (a finite number >= 0) weighs the commitment term.

    Dead codes: with ``dead_code_threshold`` > 0 (as ``threshold_ema_dead_code`` of
    vector-quantize-pytorch), a code whose running usage ``ema_count`` (the exponential
    moving average of its assignments per call, decay ``ema_decay`` or 0.99) has fallen
    below the threshold is restarted at the start of a training call: it becomes a vector
    of that call's input drawn at random (PyTorch's default generator), and its running
    usage is set to the threshold (in EMA mode its running sum to match), so it has a few
    calls to win inputs before it is restarted again. A restart is no in-place write for
    autograd: training calls may be repeated before one backward, each differentiating the
    codebook it searched.

    Casting the module (``.half()``, ``.to(torch.bfloat16)``, ``.double()``) casts the
    codebook; the EMA statistics ``ema_sum`` and ``ema_count`` stay at least float32.

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
        num_codes, dim = check_size("num_codes", num_codes), check_size("dim", dim)
        beta = check_real("beta", beta, minimum=0.0)
        ema_eps = check_real("ema_eps", ema_eps, minimum=0.0, inclusive=False)
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
        # Checked here, not only by the op: the restart below would otherwise write the codebook
        # from an input the op then rejects.
        check_float("x", x)
        channel_dim = check_dim("channel_dim", self.channel_dim, x.dim())
        if x.shape[channel_dim] != self.dim:
            raise ValueError(f"x has {x.shape[channel_dim]} features along channel_dim={self.channel_dim} but the "
                             f"quantizer's dim is {self.dim}")
        channel_last = channel_dim == x.dim() - 1
        if not channel_last:
            x = x.movedim(self.channel_dim, -1)
        if self.training and self.dead_code_threshold > 0:
            self._restart_dead_codes(x.detach().reshape(-1, self.dim))
        codebook = self.codebook  # the op casts it to x's dtype (a float32 codebook under autocast)
        if self.training and (self.ema_decay is not None or self.dead_code_threshold > 0):
            # Autograd keeps this copy for backward: the EMA update and the restarts of later
            # calls rewrite the codebook before this call's backward may run.
            codebook = codebook.clone()
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
        # In the statistics' dtype (see _apply), whatever the dtype of x and of the codebook.
        decay = self.ema_decay
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat_x.to(self.ema_sum.dtype))
        self.ema_count.mul_(decay).add_(counts.to(self.ema_count.dtype), alpha=1.0 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.ema_eps) / (total + self.num_codes * self.ema_eps) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, flat_x):
        # Every code draws a candidate and only the dead ones take it: no host sync on the dead
        # count. The codebook is written through .data, which leaves its version counter alone:
        # a call without dead codes changes nothing, and earlier calls' graphs, which kept their
        # own copy (forward), still backpropagate after a restart.
        if flat_x.shape[0] == 0:
            return
        dead = (self.ema_count < self.dead_code_threshold)[:, None]
        picked = flat_x[torch.randint(flat_x.shape[0], (self.num_codes,), device=flat_x.device)]
        self.codebook.data.copy_(torch.where(dead, picked.to(self.codebook.dtype), self.codebook))
        self.ema_count.copy_(torch.where(dead[:, 0], self.dead_code_threshold, self.ema_count))
        if self.ema_decay is not None:
            stat = picked.to(self.ema_sum.dtype) * self.dead_code_threshold
            self.ema_sum.copy_(torch.where(dead, stat, self.ema_sum))

    def _apply(self, fn, recurse=True):
        # .half() / .to(torch.bfloat16) would round the EMA statistics, sums and counts over many
        # calls that overflow float16 and lose their updates in bfloat16: keep them in float32.
        statistics = {name: self._buffers[name] for name in ("ema_sum", "ema_count") if name in self._buffers}
        super()._apply(fn, recurse)
        for name, before in statistics.items():
            after = self._buffers[name]
            if after.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = before.to(after.device, torch.float32)
        return self

    def extra_repr(self):
        ema = "" if self.ema_decay is None else f", ema_decay={self.ema_decay}, ema_eps={self.ema_eps}"
        dead = f", dead_code_threshold={self.dead_code_threshold}" if self.dead_code_threshold > 0 else ""
        return (f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, "
                f"channel_dim={self.channel_dim}{ema}{dead}")
