"""Residual VQ layer (SoundStream / EnCodec / DAC): R quantizer stages in one fused op."""
import numbers

import torch
from torch import nn

from .. import ops
from ..ops._common import check_size
from ..ops.residual_vq import residual_segment_sums
from ._codebook import check_input
from ._sync import CodebookSync
from .vq import VectorQuantizer, code_counts


class ResidualVectorQuantizer(nn.Module):
    """Residual vector quantizer: ``num_quantizers`` stages of ``num_codes`` codes of size ``dim``.

    ``forward(x, num_quantizers=None)`` returns ``(quantized, indices, losses)`` as
    :func:`fastvae.residual_quantize` over the first ``num_quantizers`` stages (all when
    ``None``; fewer for a lower bitrate): ``quantized`` is the sum of the chosen codes with
    the gradient passed straight through to ``x``, ``indices`` is ``(..., n)`` with the
    stage last, ``losses`` ``(n,)`` one per stage (sum them for the total). In EMA mode a
    stage's loss is its commitment term only, as :class:`VectorQuantizer`.

    Each stage is a :class:`VectorQuantizer` in ``stages`` (one shared by all with
    ``shared_codebook=True``) and keeps its own statistics, updated in training from the
    residual it quantized: EMA codebook (``ema_decay``), usage counts, perplexity,
    dead-code restarts (``dead_code_threshold``, after the call, from that stage's
    residuals, as vector-quantize-pytorch) and k-means initialisation on the first training
    batch, stage by stage on the residuals (``kmeans_init``).

    ``quantize_dropout``: in training, a call without ``num_quantizers`` uses a number of
    stages drawn uniformly from 1..R (PyTorch's default generator; synchronised, a
    generator seeded from rank 0's by one broadcast at the first such call, so that every
    rank draws the same number), as SoundStream.

    ``channel_dim`` and ``sync`` as :class:`VectorQuantizer`; synchronised, the stages'
    statistics are summed over ranks in one all-reduce per call, and k-means fits the
    stages to every rank's first batch.
    """

    def __init__(self, num_quantizers, num_codes, dim, beta=0.25, channel_dim=-1, *, ema_decay=None, ema_eps=1e-5,
                 dead_code_threshold=0.0, kmeans_init=False, quantize_dropout=False, shared_codebook=False, sync=None,
                 device=None, dtype=None):
        super().__init__()
        num_quantizers = check_size("num_quantizers", num_quantizers)
        self.num_quantizers, self.num_codes, self.dim = num_quantizers, num_codes, dim
        self.beta, self.channel_dim = beta, channel_dim
        self.quantize_dropout, self.shared_codebook = quantize_dropout, shared_codebook
        self._sync = CodebookSync(sync)
        self.stages = nn.ModuleList(
            VectorQuantizer(num_codes, dim, beta, -1, ema_decay, ema_eps, dead_code_threshold, kmeans_init=kmeans_init,
                            sync=sync, device=device, dtype=dtype)
            for _ in range(1 if shared_codebook else num_quantizers))

    def _stage(self, r):
        return self.stages[0 if self.shared_codebook else r]

    def codebooks(self, num_quantizers=None):
        """The stages' codebooks as one ``(n, K, D)`` tensor (differentiable)."""
        n = self.num_quantizers if num_quantizers is None else num_quantizers
        if self.shared_codebook:
            return self.stages[0].codebook.expand(n, -1, -1)
        return torch.stack([stage.codebook for stage in self.stages[:n]])

    @property
    def perplexity(self):
        """Each stage's perplexity of the last call, ``(len(stages),)``."""
        return torch.stack([stage.perplexity for stage in self.stages])

    def _stage_count(self, num_quantizers, device):
        if num_quantizers is None:
            if self.training and self.quantize_dropout:
                generator = self._sync.generator(device)  # the same draws on every rank
                return int(torch.randint(1, self.num_quantizers + 1, (), generator=generator))
            return self.num_quantizers
        if isinstance(num_quantizers, bool) or not isinstance(num_quantizers, numbers.Integral) \
                or not 1 <= num_quantizers <= self.num_quantizers:
            raise ValueError(f"num_quantizers must be an int in [1, {self.num_quantizers}], got {num_quantizers!r}")
        return int(num_quantizers)

    def forward(self, x, num_quantizers=None):
        # Checked before the k-means initialisation, which would fit the codebooks to a bad input.
        channel_last = check_input(x, self.channel_dim, self.dim) == x.dim() - 1
        source = x
        n = self._stage_count(num_quantizers, x.device)
        if not channel_last:
            x = x.movedim(self.channel_dim, -1)
        if self.training and any(stage._kmeans_pending for stage in self.stages):
            self._kmeans_initialize(x.detach().reshape(-1, self.dim), n)
        codebooks = self.codebooks(n)  # stacked: a copy, which the EMA updates and restarts leave alone
        first = self.stages[0]
        if self.shared_codebook and self.training and (first.ema_decay is not None or first.dead_code_threshold > 0):
            codebooks = codebooks.clone()  # a view of the shared codebook, rewritten after the call
        quantized, indices, losses = ops.residual_quantize(x, codebooks, beta=self.beta)
        if self.stages[0].ema_decay is not None:
            losses = losses - losses.detach() / (1.0 + self.beta)  # commitment terms only (see VectorQuantizer)
        self._update_statistics(x.detach().reshape(-1, self.dim), codebooks.detach(), indices.reshape(-1, n))
        if not channel_last:
            quantized = quantized.movedim(-1, self.channel_dim)
            if source.is_contiguous():
                quantized = quantized.contiguous()
        return quantized, indices, losses

    @staticmethod
    def _stage_residuals(flat_x, codebooks, indices):
        """Each stage's input: res_0 = x, res_{r+1} = res_r - its code (a list: torch.compile
        cannot trace a generator under no_grad, which the callers hold)."""
        residuals = [flat_x.float()]
        for r in range(codebooks.shape[0] - 1):
            residuals.append(residuals[-1] - codebooks[r].float()[indices[:, r]])
        return residuals

    @torch.no_grad()
    def _update_statistics(self, flat_x, codebooks, indices):
        n, first = codebooks.shape[0], self.stages[0]
        if self.training and first.ema_decay is not None:
            # every stage's sums of its residuals and counts in one pass, the residuals never stored
            sums, counts = residual_segment_sums(flat_x, codebooks, indices)
            statistics = [[count.to(first.ema_count.dtype), total.to(first.ema_sum.dtype)]
                          for count, total in zip(counts, sums)]
        else:  # every stage's counts in one scatter
            keys = indices + torch.arange(n, device=indices.device) * self.num_codes
            counts = code_counts(keys.reshape(-1), n * self.num_codes).view(n, self.num_codes).float()
            statistics = [[count] for count in counts]
        if self.shared_codebook:  # one stage fed every stage's residuals
            stages, statistics = [first], [[sum(parts) for parts in zip(*statistics)]]
        else:
            stages = list(self.stages[:n])
        if self.training:  # every stage's statistics in one all-reduce
            summed = iter(self._sync.all_reduce([part for parts in statistics for part in parts]))
            statistics = [[next(summed) for _ in parts] for parts in statistics]
        for stage, parts in zip(stages, statistics):
            stage._apply_statistics(parts)
        if self.training and first.dead_code_threshold > 0:
            residuals = self._stage_residuals(flat_x, codebooks, indices)
            inputs = [torch.cat(residuals)] if self.shared_codebook else residuals
            for stage, x in zip(stages, inputs):
                stage._restart_dead_codes(x)

    @torch.no_grad()
    def _kmeans_initialize(self, flat_x, n):
        """Stage by stage: stage r is fitted to the residual the fitted earlier stages leave
        (of every rank's batch when synchronised)."""
        stages = [self._stage(r) for r in range(n)]
        # `initialized` and, synchronised, the ranks' batch sizes read on the host: once
        data, initialized = self._sync.gather_first_batch(flat_x, [bool(stage.initialized) for stage in stages])
        if data is not None:
            residual = data.float()
            for stage, done in zip(stages, initialized):
                if stage._kmeans_pending and not done:
                    stage._fit_kmeans(residual.to(stage.codebook.dtype))
                index, _ = ops.nearest_code(residual, stage.codebook.float())
                residual = residual - stage.codebook.float()[index]
        for stage in stages:
            stage._kmeans_pending = False

    def lookup(self, indices):
        """``quantized`` for given ``indices`` ``(..., n)``: the sum of the stages' codes, ``channel_dim`` layout."""
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be an int64 or int32 tensor, got {indices.dtype}")
        n = indices.shape[-1]
        codebooks = self.codebooks(n)
        codes = sum(codebooks[r][indices[..., r]] for r in range(n))
        if self.channel_dim in (-1, codes.dim() - 1):
            return codes
        return codes.movedim(-1, self.channel_dim).contiguous()

    def extra_repr(self):
        return (f"num_quantizers={self.num_quantizers}, num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, "
                f"channel_dim={self.channel_dim}, quantize_dropout={self.quantize_dropout}, "
                f"shared_codebook={self.shared_codebook}")
