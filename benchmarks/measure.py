"""How the benchmark harness (harness.py) measures: interleaved median timing, peak
memory, the hardware floors a case is set against, and the machine a run describes.

* memory floor: ``bytes_moved`` (each input read once, each output written once) over
  the copy bandwidth measured on the spot;
* compute floor: ``flops`` over the matrix rate measured on the spot (float32 GEMM).
"""
import datetime
import os
import platform
import statistics
import threading
import time

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --clock: "wall" (elapsed time) or "cpu" (the process's CPU time: on a CPU shared with
# other jobs, time spent descheduled is not counted; meant for one thread, OMP_NUM_THREADS=1,
# as the CPU time of several threads adds up).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time_calls(fn, calls, device, clock=time.perf_counter):
    sync(device)
    start = clock()
    for _ in range(calls):
        fn()
    sync(device)
    return (clock() - start) / calls


def time_interleaved(candidates, device, warmup_s=0.2, samples=15, min_sample_s=0.02, clock=time.perf_counter):
    """Median seconds per call of each candidate, sampled round-robin, by ``clock`` (see
    ``CLOCKS``)."""
    calls = {}
    for name, fn in candidates.items():
        fn()
        per_call = _time_calls(fn, 1, device, clock)
        deadline = time.perf_counter() + warmup_s
        while time.perf_counter() < deadline:
            per_call = _time_calls(fn, 1, device, clock)
        calls[name] = max(1, int(min_sample_s / max(per_call, 1e-9)))
    times = {name: [] for name in candidates}
    for _ in range(samples):
        for name, fn in candidates.items():
            times[name].append(_time_calls(fn, calls[name], device, clock))
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory(fn, device):
    """Peak memory (bytes) above the starting level while ``fn`` runs."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_rss(fn)


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_peak_rss(fn):
    """CPU: poll the resident set while ``fn`` runs (allocations of a few ms or more)."""
    base, peak, done = _rss(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        fn()
    finally:
        done.set()
        poller.join()
    return max(0, max(peak[0], _rss()) - base)


_FLOORS = {}


def copy_bandwidth(device):
    """Measured copy bandwidth (bytes read + written per second) on ``device``."""
    if ("bw", device) not in _FLOORS:
        n = (256 if torch.device(device).type == "cuda" else 64) * 2**20 // 4
        src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
        t = time_interleaved({"copy": lambda: dst.copy_(src)}, device, samples=7)["copy"]
        _FLOORS[("bw", device)] = 2 * 4 * n / t
    return _FLOORS[("bw", device)]


def matrix_rate(device, dtype=torch.float32):
    """Measured dense matrix-multiply rate (FLOP/s) on ``device`` in ``dtype``."""
    if ("mm", device, dtype) not in _FLOORS:
        n = 8192 if torch.device(device).type == "cuda" else 2048
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        t = time_interleaved({"mm": lambda: a @ b}, device, samples=5)["mm"]
        _FLOORS[("mm", device, dtype)] = 2 * n**3 / t
    return _FLOORS[("mm", device, dtype)]


def floor_seconds(case):
    floors = []
    if case.bytes_moved:
        floors.append(case.bytes_moved / copy_bandwidth(case.device))
    if case.flops:
        floors.append(case.flops / matrix_rate(case.device, case.dtype))
    return max(floors) if floors else None


def environment(device):
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = _cpu_model()
    env["copy_bandwidth_gbs"] = copy_bandwidth(device) / 1e9
    env["matrix_rate_tflops_fp32"] = matrix_rate(device) / 1e12
    return env


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        flags = open("/proc/cpuinfo").read()
        isa = "avx512f" if " avx512f" in flags else "avx2" if " avx2" in flags else "no avx2"
        return f"{names[0]} ({isa}, {os.cpu_count()} cores)" if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()
