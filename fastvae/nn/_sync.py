"""The VQ layers' distributed synchronisation, all in one place.

A :class:`CodebookSync` resolves a layer's ``sync`` option at call time and runs every
collective the layer makes. Its methods make the same collectives, in the same order and
of the same shapes, on every rank whatever the rank's data (an empty batch included), and
none of them reads a device value on the host except :meth:`gather_first_batch` and the
first :meth:`generator` call (once per layer). Disabled, each method does the one-process
equivalent and no collective. The layers call them in training mode only.

The per-call collectives are functional (``torch.distributed._functional_collectives``),
which ``torch.compile`` traces without a graph break.
"""
import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

# newer torch renames all_gather_tensor (deprecated) all_gather_single
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_RANK_BITS = 20  # a pick's key is (float32 key bits << _RANK_BITS) | rank: unique, up to 2^20 ranks


class CodebookSync:
    """``sync``: ``None`` synchronises when ``torch.distributed`` is initialised with more
    than one process (decided at every call), ``True`` always (the process group must be
    initialised before the first training call), ``False`` never."""

    def __init__(self, sync):
        if sync not in (None, True, False):
            raise ValueError(f"sync must be None, True or False, got {sync!r}")
        self.sync = sync
        self._generator = None

    @property
    def enabled(self):
        if self.sync is False:
            return False
        initialized = dist.is_available() and dist.is_initialized()
        if self.sync is True and not initialized:
            raise RuntimeError("sync=True needs torch.distributed initialised (dist.init_process_group) before the "
                               "first training call; pass sync=None to synchronise only when it is")
        return initialized and (self.sync is True or dist.get_world_size() > 1)

    def all_reduce(self, tensors):
        """The element-wise sums over ranks of float ``tensors`` (a list), in one all-reduce of
        their concatenation (float32, float64 if one is); the tensors themselves when disabled."""
        if not self.enabled:
            return tensors
        dtype = torch.float64 if any(tensor.dtype == torch.float64 for tensor in tensors) else torch.float32
        flat = torch.cat([tensor.reshape(-1).to(dtype) for tensor in tensors])
        flat = funcol.all_reduce(flat, "sum", dist.group.WORLD)
        return [part.view(tensor.shape) for part, tensor in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def pick_rows(self, rows, count):
        """``(picked, found)``: ``count`` rows drawn uniformly (with replacement) from the
        concatenation of every rank's ``rows`` ``(N_rank, D)``, the same on every rank, and a
        bool ``(count,)`` that is False only where no rank had a row. Two collectives.

        Each rank draws, per pick, one of its rows and an exponential key of rate ``N_rank``
        (PyTorch's default generator); the smallest key over ranks wins (a rank with
        ``N_rank`` rows wins with probability ``N_rank / N``, an empty rank never) and only
        the winner writes its row into the summed buffer.
        """
        num_rows, dim = rows.shape
        if num_rows:
            candidates = rows[torch.randint(num_rows, (count,), device=rows.device)]
        else:
            candidates = rows.new_zeros(count, dim)
        if not self.enabled:
            # A branch, not torch.full(..., num_rows > 0): under torch.compile(dynamic=True) that
            # fill is a symbolic bool, which Inductor's CPU code generation fails on.
            found = torch.ones if num_rows else torch.zeros
            return candidates, found(count, dtype=torch.bool, device=rows.device)
        rate = float(num_rows) if num_rows else 0.0
        exponential = -torch.log1p(-torch.rand(count, dtype=torch.float64, device=rows.device))
        key = (exponential / rate).float()  # +inf for an empty rank: never below a rank with rows
        key = (key.view(torch.int32).long() << _RANK_BITS) | dist.get_rank()
        winner = key == funcol.all_reduce(key, "min", dist.group.WORLD)
        if not num_rows:
            winner = torch.zeros_like(winner)
        buffer = torch.cat([candidates.float(), torch.ones(count, 1, device=rows.device)], 1) * winner[:, None]
        buffer = funcol.all_reduce(buffer, "sum", dist.group.WORLD)
        return buffer[:, :dim].to(rows.dtype), buffer[:, dim] > 0

    def gather_first_batch(self, rows, initialized):
        """For the k-means initialisation: ``(data, initialized_everywhere)``.

        ``initialized`` is a list of bools (one per codebook); ``initialized_everywhere`` is
        their AND over ranks. ``data`` is every rank's ``rows`` concatenated in rank order
        (uneven and empty batches allowed), or None when every codebook is initialised
        everywhere. Reads the batch sizes on the host (the layers call this once).
        """
        if not self.enabled:
            return (None if all(initialized) else rows), list(initialized)
        world = dist.get_world_size()
        header = torch.tensor([rows.shape[0], *initialized], dtype=torch.int64, device=rows.device)
        headers = _all_gather(header, 0, dist.group.WORLD).view(world, -1).cpu()
        sizes = headers[:, 0].tolist()
        initialized = [bool(flag) for flag in headers[:, 1:].all(0)]
        if all(initialized):
            return None, initialized
        dtype = rows.dtype if rows.dtype in (torch.float32, torch.float64) else torch.float32
        padded = rows.new_zeros(max(sizes), rows.shape[1], dtype=dtype)
        padded[:rows.shape[0]] = rows
        gathered = _all_gather(padded, 0, dist.group.WORLD).view(world, max(sizes), -1)
        return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)]), initialized

    def generator(self, device):
        """A CPU generator in the same state on every rank (seeded from rank 0's default
        generator by one broadcast at the first call); None (PyTorch's default generator)
        when disabled."""
        if not self.enabled:
            return None
        if self._generator is None:
            seed = torch.randint(2 ** 62, (1,), dtype=torch.int64).to(device)
            seed = int(funcol.broadcast(seed, 0, dist.group.WORLD).item())
            self._generator = torch.Generator().manual_seed(seed)
        return self._generator
