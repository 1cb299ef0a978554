"""VQ column layers: the VQ-VAE quantizer (gradient or EMA codebook, dead-code restarts, usage statistics)."""
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._common import check_real, check_size
from ..ops.kmeans import segment_mean
from ._codebook import check_input, check_tokenizer_options, init_codebook_
from ._sync import CodebookSync


def code_counts(indices, num_codes):
    """How often each code occurs in ``indices`` (int64): ``scatter_add_`` of ones, not
    ``bincount``, which syncs with the host on CUDA."""
    return indices.new_zeros(num_codes).scatter_add_(0, indices, torch.ones_like(indices))


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
    maps (``quantized`` then has ``x``'s shape and memory format and ``indices`` is
    ``(B, H, W)``).

    Tokenizer options (vector-quantize-pytorch / ViT-VQGAN / LlamaGen):

    * ``kmeans_init``: the codebook is fitted by :func:`fastvae.kmeans` (``kmeans_iters``
      iterations) on the first training batch, which needs at least ``num_codes`` vectors;
      the buffer ``initialized`` records it (and travels in checkpoints).
    * ``cosine``: inputs and codes are l2-normalised; the search, the loss and ``quantized``
      live on the unit sphere, and the EMA renormalises the codes after every update.
    * ``codebook_dim``: when it differs from ``dim``, ``project_in`` (``Linear(dim,
      codebook_dim)``) maps inputs to the search space and ``project_out`` maps the codes
      back; the codebook is ``(num_codes, codebook_dim)`` and the loss is measured there.
    * ``estimator``: ``"ste"`` (straight-through) or ``"rotation"`` (the rotation trick),
      as :func:`fastvae.vector_quantize`.
    * ``ema_debias``: the EMA starts at zero and is divided by ``1 - decay^t`` (Sonnet 2,
      buffer ``ema_steps``) instead of starting at one pseudo-assignment per code.
    * ``codebook_init``: ``"uniform"`` (+-1/K, the original VQ-VAE and taming; default),
      ``"normal"`` (N(0, 1) codes, zero EMA counts), ``"kaiming"`` (vector-quantize-pytorch:
      kaiming-uniform, bound ``sqrt(6 / (num_codes * dim))``). With a dead-code threshold,
      every code starts as if just restarted (running usage at least the threshold), so the
      first calls do not restart the whole codebook.
    * ``sync``: distributed training (``torch.distributed``, any backend). ``None``
      (default) synchronises when the process group is initialised with more than one
      process (decided at each call), ``True`` always (initialise it before the first
      training call), ``False`` never. Synchronised, every training call leaves the same
      codebook and statistics on every rank, those of one process fed the concatenation of
      the ranks' batches: the EMA counts and sums (with the usage counts and perplexity)
      are summed over ranks in one all-reduce (float32: counts exact below 2^24 per code
      and call); k-means fits every rank's first batch, gathered (its sizes read on the
      host, once); a dead code restarts at a vector drawn uniformly from every rank's batch,
      the same on every rank (two more collectives per call). Every rank must make the same
      training calls (an empty batch is fine); ``eval()`` calls make no collective and
      report this rank's perplexity. A gradient-trained codebook's gradient is averaged by
      ``DistributedDataParallel``, not here. See the README, "Training on several GPUs".

    ``lookup(indices)`` returns the codes of ``indices`` as ``forward`` returns them (output
    space, ``channel_dim`` layout). ``load_state_dict`` accepts checkpoints without the
    usage statistics; ``VectorQuantizer.from_state_dict`` reads fastvae, taming/diffusers
    and vector-quantize-pytorch checkpoints.
    """

    def __init__(self, num_codes, dim, beta=0.25, channel_dim=-1, ema_decay=None, ema_eps=1e-5,
                 dead_code_threshold=0.0, *, kmeans_init=False, kmeans_iters=10, cosine=False, codebook_dim=None,
                 estimator="ste", ema_debias=False, codebook_init="uniform", legacy_beta=False, sync=None,
                 device=None, dtype=None):
        super().__init__()
        num_codes, dim = check_size("num_codes", num_codes), check_size("dim", dim)
        beta = check_real("beta", beta, minimum=0.0)
        ema_eps = check_real("ema_eps", ema_eps, minimum=0.0, inclusive=False)
        if legacy_beta and not beta > 0:
            raise ValueError(f"legacy_beta=True weighs the codebook term by beta, which must then be > 0, got {beta}")
        check_tokenizer_options(kmeans_iters=kmeans_iters, codebook_dim=codebook_dim, estimator=estimator,
                                ema_debias=ema_debias, ema_decay=ema_decay, codebook_init=codebook_init)
        self._sync = CodebookSync(sync)
        if ema_decay is not None and not 0.0 < check_real("ema_decay", ema_decay, minimum=0.0) < 1.0:
            raise ValueError(f"ema_decay must be None or in (0, 1), got {ema_decay}")
        dead_code_threshold = check_real("dead_code_threshold", dead_code_threshold, minimum=0.0)
        self.num_codes, self.dim, self.beta, self.channel_dim = num_codes, dim, beta, channel_dim
        self.ema_decay, self.ema_eps, self.dead_code_threshold = ema_decay, ema_eps, dead_code_threshold
        self.kmeans_init, self.kmeans_iters, self.cosine, self.estimator = kmeans_init, kmeans_iters, cosine, estimator
        self.ema_debias, self.codebook_init, self.legacy_beta = ema_debias, codebook_init, legacy_beta
        self.codebook_dim = dim if codebook_dim is None else codebook_dim
        factory = {"device": device, "dtype": dtype}
        if self.codebook_dim != dim:
            self.project_in = nn.Linear(dim, self.codebook_dim, **factory)
            self.project_out = nn.Linear(self.codebook_dim, dim, **factory)
        else:
            self.project_in = self.project_out = None
        search_dim = self.codebook_dim
        if ema_decay is None:
            self.codebook = nn.Parameter(torch.empty(num_codes, search_dim, **factory))
        else:
            self.register_buffer("codebook", torch.empty(num_codes, search_dim, **factory))
            self.register_buffer("ema_sum", torch.empty(num_codes, search_dim, device=device, dtype=torch.float32))
        if ema_decay is not None or dead_code_threshold > 0:
            self.register_buffer("ema_count", torch.empty(num_codes, device=device, dtype=torch.float32))
        if ema_debias:
            self.register_buffer("ema_steps", torch.zeros((), device=device, dtype=torch.int64))
        if kmeans_init:
            self.register_buffer("initialized", torch.zeros((), device=device, dtype=torch.bool))
        self._kmeans_pending = kmeans_init  # host-side mirror of `initialized`: one sync at most
        self.register_buffer("usage_count", torch.zeros(num_codes, device=device, dtype=torch.int64))
        # exp(entropy) of the last call's code frequencies; NaN before the first call
        self.register_buffer("perplexity", torch.full((), float("nan"), device=device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            initial_count = init_codebook_(self.codebook, self.codebook_init, self.cosine)
            for name, value in self._initial_statistics(self.codebook, initial_count).items():
                getattr(self, name).copy_(value)
            if self._kmeans_pending or hasattr(self, "initialized"):
                self.initialized.fill_(False)
                self._kmeans_pending = True

    @torch.no_grad()
    def _initial_statistics(self, codebook, initial_count=1.0):
        """The EMA and dead-code statistics of a new layer whose codes are ``codebook``, each
        counted as ``initial_count`` pseudo-assignments: ``{buffer name: value}`` (empty for a
        gradient-trained codebook without restarts)."""
        statistics = {}
        if self.ema_debias:
            initial_count = 0.0  # the debiased average ignores its starting value
            statistics["ema_steps"] = torch.zeros_like(self.ema_steps)
        if self.ema_decay is not None or self.dead_code_threshold > 0:
            if not self.ema_debias:  # a new code counts as just restarted: no restart before it had a chance
                initial_count = max(initial_count, self.dead_code_threshold)
            statistics["ema_count"] = torch.full_like(self.ema_count, initial_count)
        if self.ema_decay is not None:
            statistics["ema_sum"] = codebook.to(self.ema_sum.dtype) * initial_count
        return statistics

    def reset_usage(self):
        self.usage_count.zero_()

    def forward(self, x):
        # Checked here, not only by the op: the restart below would otherwise write the codebook
        # from an input the op then rejects.
        channel_dim = check_input(x, self.channel_dim, self.dim)
        source = x
        channel_last = channel_dim == x.dim() - 1
        if not channel_last:
            x = x.movedim(self.channel_dim, -1)
        x = self._to_search_space(x)
        if self.training and self._kmeans_pending:
            self._kmeans_initialize(x.detach().reshape(-1, self.codebook_dim))
        if self.training and self.dead_code_threshold > 0:
            self._restart_dead_codes(x.detach().reshape(-1, self.codebook_dim))
        codebook = self.codebook  # the op casts it to x's dtype (a float32 codebook under autocast)
        if self.training and (self.ema_decay is not None or self.dead_code_threshold > 0):
            # Autograd keeps this copy for backward: the EMA update and the restarts of later
            # calls rewrite the codebook before this call's backward may run.
            codebook = codebook.clone()
        # legacy_beta (taming's legacy=True): beta weighs the codebook term, 1 the commitment term
        op_beta, loss_scale = (1.0 / self.beta, self.beta) if self.legacy_beta else (self.beta, 1.0)
        quantized, indices, loss = ops.vector_quantize(x, codebook, beta=op_beta, estimator=self.estimator)
        if self.ema_decay is not None:
            # The op's loss is (1 + beta) * mse with gradient only through the commitment term
            # (the codebook buffer takes none): subtracting the detached mse leaves beta * mse
            # with that same gradient, without another pass over x.
            loss = loss - loss.detach() / (1.0 + op_beta)
        if self.legacy_beta:
            loss = loss * loss_scale
        self._update_statistics(x.detach().reshape(-1, self.codebook_dim), indices.reshape(-1))
        return self._to_output(quantized, source), indices, loss

    @torch.no_grad()
    def _update_statistics(self, flat_x, indices):
        """Perplexity; in training, usage counts and the EMA (or the dead-code usage average),
        over every rank's batch when synchronised."""
        statistics = self._local_statistics(flat_x, indices)
        if self.training:
            statistics = self._sync.all_reduce(statistics)
        self._apply_statistics(statistics)

    def _local_statistics(self, flat_x, indices):
        """What the ranks sum: ``[counts]`` (K,) float, and in EMA training ``sums`` (K, D)
        of the inputs assigned to each code."""
        counts = code_counts(indices, self.num_codes)
        if not (self.training and self.ema_decay is not None):
            return [counts.float()]
        # the deterministic segment-mean op (torch's CPU index_add_ is ~100x slower here), in
        # the statistics' dtype (see _apply) whatever the dtype of x and of the codebook
        means, _ = segment_mean(flat_x.to(self.ema_sum.dtype), indices, self.num_codes)
        counts = counts.to(self.ema_count.dtype)
        return [counts, means * counts[:, None]]

    def _apply_statistics(self, statistics):
        counts = statistics[0]
        probs = counts.float() / counts.float().sum().clamp_min(1.0)
        self.perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum())
        if self.training:
            self.usage_count += counts.round().long()  # synchronised: float sums, exact below 2^24
            if self.ema_decay is not None:
                self._ema_update(counts.to(self.ema_count.dtype), statistics[1].to(self.ema_sum.dtype))
            elif self.dead_code_threshold > 0:
                self.ema_count.mul_(0.99).add_(counts.to(self.ema_count.dtype), alpha=0.01)

    @classmethod
    def from_state_dict(cls, state_dict, *, layout="fastvae", prefix="", **options):
        """A quantizer built from a checkpoint, its sizes inferred from the tensors.

        ``layout``: ``"fastvae"`` (this class's ``state_dict``), ``"taming"`` (taming's
        ``VectorQuantizer``/``VectorQuantizer2`` and diffusers' ``VectorQuantizer``:
        ``embedding.weight``; ``channel_dim`` defaults to 1; pass ``legacy_beta=True`` for
        ``legacy=True``, the diffusers ``VQModel`` default), or ``"vector_quantize_pytorch"``
        (``VectorQuantize`` with one head: ``_codebook.embed``, its EMA state
        ``embed_avg``/``cluster_size`` in EMA mode, ``project_in``/``project_out``; its
        defaults ``ema_decay=0.8``, ``beta=1.0`` (commitment weight), ``estimator="rotation"``
        unless given). ``prefix`` selects the quantizer's keys in a whole model's state dict
        (e.g. ``"quantize."``); ``options`` are constructor arguments, which take precedence.
        """
        from .vq_checkpoints import build_from_state_dict
        return build_from_state_dict(cls, state_dict, layout, prefix, options)

    def _to_search_space(self, x):
        """Channel-last input -> the vectors searched: projected, then on the sphere (cosine)."""
        if self.project_in is not None:
            x = self.project_in(x)
        return F.normalize(x, dim=-1) if self.cosine else x

    def _to_output(self, codes, source=None):
        """Codes of the search space -> output space, ``channel_dim`` layout, ``source``'s memory format."""
        if self.project_out is not None:
            codes = self.project_out(codes)
        if self.channel_dim in (-1, codes.dim() - 1):
            return codes
        codes = codes.movedim(-1, self.channel_dim)
        return codes.contiguous() if source is None or source.is_contiguous() else codes

    def lookup(self, indices):
        """The codes of ``indices`` (int tensor of any shape) as ``forward`` returns them:
        projected out, with the features at ``channel_dim``."""
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be an int64 or int32 tensor, got {indices.dtype}")
        codebook = F.normalize(self.codebook, dim=-1) if self.cosine else self.codebook
        return self._to_output(F.embedding(indices, codebook))

    @torch.no_grad()
    def _kmeans_initialize(self, flat_x):
        # Reads `initialized` (set by a loaded checkpoint) and, synchronised, every rank's batch
        # size: the layer's one host sync.
        data, _ = self._sync.gather_first_batch(flat_x, [bool(self.initialized)])
        if data is not None:
            self._fit_kmeans(data)
        self._kmeans_pending = False

    @torch.no_grad()
    def _fit_kmeans(self, data):
        """Fit the codebook to ``data`` (every rank's first batch when synchronised)."""
        if data.shape[0] < self.num_codes:
            raise ValueError(f"kmeans_init needs a first training batch (over all ranks when synchronised) of at "
                             f"least num_codes ({self.num_codes}) vectors, got {data.shape[0]}; use a larger first "
                             "batch or kmeans_init=False")
        centroids, indices = ops.kmeans(data, self.num_codes, iters=self.kmeans_iters,
                                        generator=self._sync.generator(data.device))
        if self.cosine:
            centroids = F.normalize(centroids, dim=-1)
        self.codebook.copy_(centroids)
        if self.ema_decay is not None or self.dead_code_threshold > 0:
            counts = code_counts(indices, self.num_codes).float()
            if self.ema_debias:  # stored undebiased: t = 1 after this pseudo-update
                counts = counts * (1.0 - self.ema_decay)
                self.ema_steps.fill_(1)
            self.ema_count.copy_(counts)
            if self.ema_decay is not None:
                self.ema_sum.copy_(centroids * counts[:, None])
        self.initialized.fill_(True)
        self._kmeans_pending = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints without the usage statistics (older fastvae, other libraries) load: the
        # usage counts, and without EMA the running usage that dead-code restarts read.
        if prefix + "usage_count" not in state_dict:
            state_dict[prefix + "usage_count"] = torch.zeros_like(self.usage_count)
        if prefix + "ema_count" not in state_dict and self.ema_decay is None and self.dead_code_threshold > 0:
            state_dict[prefix + "ema_count"] = self._initial_statistics(self.codebook)["ema_count"]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if hasattr(self, "initialized"):
            self._kmeans_pending = True  # re-read `initialized` on the next training call

    def _ema_update(self, counts, sums):
        """One EMA step from this call's (all ranks') code ``counts`` and ``sums`` of inputs."""
        decay = self.ema_decay
        self.ema_count.mul_(decay).add_(counts, alpha=1.0 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
        if self.ema_debias:
            self.ema_steps += 1
        count, total_sum = self._ema_averages()
        total = count.sum()
        smoothed = (count + self.ema_eps) / (total + self.num_codes * self.ema_eps) * total
        codes = total_sum / smoothed[:, None]
        # Averages that started at zero (ema_debias, codebook_init="normal") and have seen only
        # empty batches are 0 / 0: the codes stay where they are (no host sync to test it).
        codes = torch.where(total > 0, codes, self.codebook.to(codes.dtype))
        self.codebook.copy_(F.normalize(codes, dim=-1) if self.cosine else codes)

    def _ema_averages(self):
        """(counts, sums) of the EMA: divided by 1 - decay^t with ema_debias (NaN before the first step)."""
        if not self.ema_debias:
            return self.ema_count, self.ema_sum
        bias = self._ema_bias()
        return self.ema_count / bias, self.ema_sum / bias

    def _ema_bias(self):
        return (1.0 - self.ema_decay ** self.ema_steps.double()).float()

    @torch.no_grad()
    def _restart_dead_codes(self, flat_x):
        # Every code draws a candidate and only the dead ones take it: no host sync on the dead
        # count. The codebook is written through .data, which leaves its version counter alone:
        # a call without dead codes changes nothing, and earlier calls' graphs, which kept their
        # own copy (forward), still backpropagate after a restart.
        # Synchronised, the candidates come from every rank's batch, the same on every rank.
        picked, found = self._sync.pick_rows(flat_x, self.num_codes)
        # debiased counts are NaN before the first update: nothing is dead yet
        usage = self.ema_count / self._ema_bias() if self.ema_debias else self.ema_count
        dead = ((usage < self.dead_code_threshold) & found)[:, None]
        self.codebook.data.copy_(torch.where(dead, picked.to(self.codebook.dtype), self.codebook))
        restart_count = self.dead_code_threshold * (self._ema_bias() if self.ema_debias else 1.0)  # stored biased
        self.ema_count.copy_(torch.where(dead[:, 0], restart_count, self.ema_count))
        if self.ema_decay is not None:
            stat = picked.to(self.ema_sum.dtype) * restart_count
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
        extra = f", codebook_dim={self.codebook_dim}" if self.codebook_dim != self.dim else ""
        extra += "".join(f", {name}={getattr(self, name)!r}" for name, default in _REPR_DEFAULTS
                        if getattr(self, name) != default)
        return (f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, "
                f"channel_dim={self.channel_dim}{ema}{dead}{extra}")


_REPR_DEFAULTS = (("kmeans_init", False), ("cosine", False), ("estimator", "ste"), ("ema_debias", False),
                  ("codebook_init", "uniform"), ("legacy_beta", False))
