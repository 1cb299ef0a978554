"""What synchronising a quantizer costs per training call (issue 12).

    python benchmarks/bench_distributed.py [--quick] [--samples 5] [--ranks 2]

Spawns ``--ranks`` local processes (gloo, CPU; the machine's cores split between them)
and times, on each, a training call of ``VectorQuantizer(8192, 256)`` at 32768 tokens
(EMA decay 0.8; and with a dead-code threshold, whose restarts add two collectives),
``sync=False`` against ``sync=True``, interleaved, a fixed number of calls in lockstep
(every rank makes the same calls). Prints the median ms per call, the difference (the
sync's cost) and the bytes each rank all-reduces per call (counted at the collectives);
rank 0's numbers go to ``benchmarks/results/distributed-cpu-DATE.json``. The gloo
all-reduce runs over loopback TCP here: on GPUs with NCCL the bytes stay the same and the
time is the interconnect's.
"""
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import harness
from fastvae.nn import VectorQuantizer
from fastvae.nn import _sync


class CountingCollectives:
    """``funcol`` as ``_sync`` uses it, counting the bytes handed to ``all_reduce``."""

    def __init__(self, funcol):
        self.funcol, self.bytes = funcol, 0

    def all_reduce(self, tensor, op, group):
        self.bytes += tensor.numel() * tensor.element_size()
        return self.funcol.all_reduce(tensor, op, group)

    def __getattr__(self, name):
        return getattr(self.funcol, name)


def _worker(rank, world, folder, args):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    counter = _sync.funcol = CountingCollectives(_sync.funcol)
    tokens, dim, codes = (4096, 64, 1024) if args.quick else (32768, 256, 8192)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(rank))
    records = []
    for label, options in {"ema": dict(ema_decay=0.8), "ema + dead codes": dict(ema_decay=0.8,
                                                                                dead_code_threshold=1e-3)}.items():
        layers = {sync: VectorQuantizer(codes, dim, sync=sync, **options) for sync in (False, True)}
        times = {sync: [] for sync in layers}
        for layer in layers.values():  # warm-up
            layer(x)
        for _ in range(args.samples):
            for sync, layer in layers.items():
                dist.barrier()  # the ranks start each call together: time the call, not the wait
                before = counter.bytes
                start = time.perf_counter()
                layer(x)
                times[sync].append(time.perf_counter() - start)
                sent = counter.bytes - before
        plain, synced = (statistics.median(times[sync]) for sync in (False, True))
        records.append({"op": f"VectorQuantizer training call ({label})", "shape": [tokens, dim], "codes": codes,
                        "ranks": world, "backend": "gloo", "call_ms": plain * 1e3, "synced_call_ms": synced * 1e3,
                        "sync_ms": (synced - plain) * 1e3, "all_reduce_bytes_per_call": sent})
    if rank == 0:
        for r in records:
            print(f"{r['op']} at {tuple(r['shape'])}, {r['codes']} codes, {world} ranks: call {r['call_ms']:.1f} ms, "
                  f"synced {r['synced_call_ms']:.1f} ms, sync {r['sync_ms']:+.1f} ms, "
                  f"{r['all_reduce_bytes_per_call'] / 2**20:.2f} MiB all-reduced per call")
        harness.save("distributed", records, "cpu", args.out)
    dist.destroy_process_group()


def main():
    p = harness.parser(__doc__)
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    args.samples = min(args.samples, 5)  # a call takes seconds on a CPU
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(args.ranks, folder, args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
