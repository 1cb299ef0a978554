"""The benchmark harness every ``bench_*.py`` uses.

Candidates of one case run interleaved in one process (round-robin, after warm-up), so
drift of clocks or load hits them alike. Each sample times enough calls to last
``min_sample_s``; the reported time is the median sample. Every case prints a row per
candidate with the speed-up of the fastvae candidate over each alternative and the
fraction of the hardware floor reached (memory or compute: measure.py times the
candidates and measures the floors).

Results also go to a JSON file (``--out``), one record per (case, candidate). One
progress bar (tqdm, where installed) runs over every case of the run.

Suites: the default is a representative CPU suite (every op, forward and forward+backward,
at one or two shapes: all benchmarks in a few minutes on a 2-core CPU); ``--full`` runs
every shape; ``--quick`` the first shape of each list (a smoke test). On CUDA the default
is the benchmarks' GPU shapes, all of them.
"""
import argparse
import contextlib
import datetime
import io
import json
import os
import sys
import traceback

import torch

from measure import CLOCKS, environment, floor_seconds, peak_memory, time_interleaved


class Case:
    """One benchmark case: candidates doing the same work on the same inputs."""

    def __init__(self, op, shape, candidates, bytes_moved=0, flops=0, device="cpu", dtype=torch.float32,
                 mode="forward", memory=False, max_samples=None, targets=(), report=None):
        self.op, self.shape, self.candidates = op, shape, candidates
        # (alternative, minimum fastvae speed-up over it, text): printed "met" or "not met" and recorded
        self.targets = targets
        self.report = report  # called with the case's records after they print (a case's own verdicts)
        self.bytes_moved, self.flops, self.device, self.dtype = bytes_moved, flops, device, dtype
        self.mode, self.memory = mode, memory
        self.max_samples = max_samples  # for cases whose slowest candidate takes seconds a call


def run_case(case, args):
    samples = args.samples or (7 if suite(args) == "default" else 15)
    samples = min(samples, case.max_samples or samples)
    times = time_interleaved(case.candidates, case.device, samples=samples, clock=CLOCKS[args.clock])
    floor = floor_seconds(case)
    ours = {n: t for n, t in times.items() if n.startswith("fastvae")}
    best_ours = min(ours.values()) if ours else None
    records = []
    for name, seconds in times.items():
        record = {
            "op": case.op, "mode": case.mode, "shape": list(case.shape), "dtype": str(case.dtype).replace("torch.", ""),
            "device": case.device, "candidate": name, "median_ms": seconds * 1e3,
            "floor_fraction": floor / seconds if floor else None,
            "fastvae_speedup": (seconds / best_ours) if best_ours and not name.startswith("fastvae") else None,
        }
        if case.memory:
            record["peak_mib"] = peak_memory(case.candidates[name], case.device) / 2**20
        records.append(record)
    _print_records(records, floor)
    for alternative, minimum, text in case.targets:
        record = next((r for r in records if r["candidate"] == alternative), None)
        if record is None:  # an optional peer not installed
            continue
        record["target"], record["target_met"] = text, record["fastvae_speedup"] >= minimum
        print(f"  target: {text}: {'met' if record['target_met'] else 'not met'} ({record['fastvae_speedup']:.2f}x)")
    if case.report is not None:
        case.report(records)
    return records


def _print_records(records, floor):
    head = records[0]
    floor_txt = f"floor {floor * 1e3:.3f} ms" if floor else "no floor"
    print(f"\n{head['op']} {head['mode']} shape={tuple(head['shape'])} {head['dtype']} on {head['device']} ({floor_txt})")
    print(f"  {'candidate':<28}{'median ms':>11}{'of floor':>10}{'fastvae x':>11}" +
          (f"{'peak MiB':>10}" if "peak_mib" in head else ""))
    for r in records:
        frac = f"{100 * r['floor_fraction']:.0f}%" if r["floor_fraction"] else "-"
        speed = f"{r['fastvae_speedup']:.2f}x" if r["fastvae_speedup"] else "-"
        mem = f"{r['peak_mib']:>10.1f}" if "peak_mib" in r else ""
        print(f"  {r['candidate']:<28}{r['median_ms']:>11.3f}{frac:>10}{speed:>11}{mem}")


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=None,
                   help="timed samples per candidate, the median reported (default: 15; 7 in the default CPU suite)")
    p.add_argument("--quick", action="store_true", help="the first shape of each list only (smoke test)")
    p.add_argument("--full", action="store_true",
                   help="every CPU shape (the complete suite: tens of minutes on 2 cores); CUDA runs every GPU "
                        "shape anyway")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile candidates")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: the process's CPU time, steadier on a shared CPU "
                        "(with OMP_NUM_THREADS=1)")
    p.add_argument("--only", default=None, metavar="TEXT",
                   help="run only the cases whose op name contains TEXT, e.g. --only GumbelQuantizer")
    p.add_argument("--out", default=None,
                   help="JSON file for the results, or a folder for them (default: benchmarks/results/)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated input dtypes, e.g. float32,bfloat16 (default: those two on CUDA, float32 on CPU)")
    return p


def suite(args):
    """``"quick"``, ``"full"`` or ``"default"``: the suite the flags ask for (CUDA: full unless --quick)."""
    if args.quick:
        return "quick"
    return "full" if args.full or args.device.startswith("cuda") else "default"


def shapes(args, full, representative, quick=None):
    """The shapes a benchmark runs of its list ``full``: ``quick`` (default: the first of
    ``full``) for --quick, all of them for --full (and on CUDA), else ``representative``
    (the default CPU suite)."""
    return {"quick": quick or full[:1], "full": full, "default": representative}[suite(args)]


def dtypes(args):
    """The input dtypes to run: ``--dtypes``, else float32 and bfloat16 on CUDA, float32 on CPU."""
    if args.dtypes:
        return [getattr(torch, name.strip()) for name in args.dtypes.split(",")]
    return [torch.float32, torch.bfloat16] if torch.device(args.device).type == "cuda" else [torch.float32]


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def save(name, records, args, out=None):
    """Write ``records`` to the file ``out``, else to ``<name>-<device>[-<suite>]-<date>.json``
    (no suite in the name for the full suite) in the folder ``out`` (one that exists, or a
    path ending in ``/``; for a run writing several benchmarks' results, such as $OUT on
    the GPU machine), else in ``results/``."""
    tag = torch.cuda.get_device_name().replace(" ", "_") if torch.device(args.device).type == "cuda" else "cpu"
    run = suite(args)
    file_name = "-".join([name, tag] + ([] if run == "full" else [run]) + [datetime.date.today().isoformat()]) + ".json"
    folder = out if out and (os.path.isdir(out) or out.endswith(os.sep)) else None
    path = os.path.join(folder or RESULTS, file_name) if folder or not out else out
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"bench": name, "suite": run, "clock": args.clock,
                   "environment": environment(args.device), "records": records},
                  f, indent=1)
    return path


def forward_backward(fn, *inputs):
    """A callable running ``fn`` on leaf copies of ``inputs`` and back-propagating the sum
    of its float outputs (grads reset each call)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def step():
        for leaf in leaves:
            leaf.grad = None
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs if o.is_floating_point()).backward()

    return step


def compiled(fn, args):
    """``torch.compile(fn)`` unless ``--no-compile`` (None then).

    Dynamo's caches are reset first: one function compiled for many shapes would hit the
    recompile limit, past which "torch.compile" silently runs eager.
    """
    if args.no_compile:
        return None
    torch._dynamo.reset()
    return torch.compile(fn)


def fastvae_candidates(call, device, ops):
    """``{"fastvae[<backend>]": call}`` for each kernel backend running all of ``ops`` on
    ``device``. The ``torch`` backend is the spec, not a contender (its Philox runs as int64
    tensor ops), and is left out.

    The backend is switched with the global ``set_backend`` (an assignment) and restored
    after the call, which costs nothing measurable even at tiny shapes.
    """
    import fastvae
    from fastvae import _backend

    out = {}
    device_type = torch.device(device).type
    for name in fastvae.available_backends():
        if name in ("auto", "torch"):
            continue
        backend = _backend._BACKENDS[name]
        if any(backend.why_not(op, device_type, torch.float32) is not None for op in ops):
            continue

        def run(name=name):
            fastvae.set_backend(name)
            try:
                return call()
            finally:
                fastvae.set_backend("auto")

        out[f"fastvae[{name}]"] = run
    return out


def against_torch(ours, eager, comp, device, ops):
    """fastvae's kernel backends running ``ours``, then ``torch eager`` and, unless
    compilation is off (``comp`` None), ``torch.compile``."""
    candidates = fastvae_candidates(ours, device, ops)
    candidates["torch eager"] = eager
    if comp is not None:
        candidates["torch.compile"] = comp
    return candidates


def add_peer(candidates, name, peer):
    """Add an optional peer library's candidate; ``peer`` is ``(callable or None, note)``
    and the note (why it is missing) is printed instead."""
    run, note = peer
    if run is not None:
        candidates[name] = run
    elif note:
        print(note)


def selected(case, args):
    """Whether ``--only`` (a substring of the case's op name) keeps ``case``."""
    return args.only is None or args.only in case.op


def _count_cases(cases, args):
    """How many cases ``cases(args)`` yields: a dry pass that builds each case's inputs
    (one case at a time) and times nothing; its notes are not printed twice."""
    count = 0
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            for case in cases(args):
                count += selected(case, args)
        except Exception:  # the timed pass reports it
            pass
    return count


class _Progress:
    """One tqdm bar over every case of a run, printed lines going above it; a line per case
    where tqdm is not installed."""

    def __init__(self, total):
        self.done, self.total = 0, total
        try:
            from tqdm import tqdm
            from tqdm.contrib import DummyTqdmFile
        except ImportError:
            self.bar, self.stdout = None, contextlib.nullcontext()
            return
        self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True, smoothing=0)
        self.stdout = contextlib.redirect_stdout(DummyTqdmFile(sys.stdout))

    def start(self, name, case):
        label = f"{name}: {case.op} {case.mode} {tuple(case.shape)}"
        if self.bar is None:
            print(f"[{self.done + 1}/{self.total}] {label}", flush=True)
        else:
            self.bar.set_description_str(label[:60])

    def advance(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_benches(benches, args):
    """Run each ``(name, cases)`` of ``benches`` in turn under one progress bar, saving a
    benchmark's records after each of its cases (a crash or kill keeps what was measured).
    ``args.out`` is the JSON file for one benchmark, a folder (``<name>.json`` each) for
    several. A benchmark that raises is reported and the next one runs. Returns
    ``({name: path}, [names that failed])``."""
    progress = _Progress(sum(_count_cases(cases, args) for _, cases in benches))
    paths, failed = {}, []
    with progress.stdout:
        for name, cases in benches:
            out = os.path.join(args.out, f"{name}.json") if args.out and len(benches) > 1 else args.out
            print(f"\n=== {name} ({suite(args)} suite)")
            records = []
            try:
                for case in filter(lambda case: selected(case, args), cases(args)):
                    progress.start(name, case)
                    records += run_case(case, args)
                    paths[name] = save(name, records, args, out or paths.get(name))
                    progress.advance()
            except Exception:
                traceback.print_exc(file=sys.stdout)
                failed.append(name)
            if name in paths:
                print(f"\nresults written to {paths[name]}")
    progress.close()
    return paths, failed


def main(name, cases, description):
    """Parse the common flags and run every case of ``cases(args)`` (see ``run_benches``)."""
    args = parser(description).parse_args()
    _, failed = run_benches([(name, cases)], args)
    if failed:
        sys.exit(1)
