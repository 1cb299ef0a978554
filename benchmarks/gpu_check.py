"""The GPU check in one command: on a CUDA machine, the gpu-marked tests, then every
benchmark at its GPU shapes in float32 and bfloat16, all results in one folder.

    python -m nox -s gpu                 # builds fastvae against the installed CUDA torch, then runs this
    python benchmarks/gpu_check.py [--out DIR] [--quick]

The folder is ``--out``, else ``$OUT``, else ``benchmarks/results/gpu-<gpu>-<date>/``; it
gets ``environment.json``, ``gpu-tests.log`` and ``gpu-tests.xml`` (pytest's report),
``<bench>.json`` and ``<bench>.log`` per benchmark, and ``summary.json``. Each step has a
time limit (the whole run fits 8 minutes on one H100/H200); a step that fails or runs out
of time is reported and the next one still runs (benchmarks save after every case, so a
stopped one keeps what it measured). Exits non-zero if any step failed.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# (name, seconds allowed): tests first (they include the N * D > 2^31 VQ run and graph capture)
TEST_LIMIT_S = 170
BENCHMARKS = [("gaussian", 90), ("gumbel", 75), ("vq", 90), ("overhead", 30)]


def _output_folder(args):
    if args.out or os.environ.get("OUT"):
        return args.out or os.environ["OUT"]
    gpu = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "no-gpu"
    return os.path.join(HERE, "results", f"gpu-{gpu}-{datetime.date.today().isoformat()}")


def _environment():
    import fastvae

    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": sys.version.split()[0], "backends": fastvae.available_backends(),
           "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _step(name, command, limit_s, log_path):
    """Run ``command`` with output teed to ``log_path``; return its summary record."""
    print(f"\n=== {name} (limit {limit_s} s): {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(limit_s, process.kill)  # stops a step that hangs silently too
        watchdog.start()
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        process.wait()
        stopped = not watchdog.is_alive()
        watchdog.cancel()
    status = (f"stopped after {limit_s} s" if stopped else
              "passed" if process.returncode == 0 else f"failed (exit {process.returncode})")
    seconds = time.perf_counter() - start
    print(f"=== {name}: {status} in {seconds:.0f} s", flush=True)
    return {"step": name, "status": status, "seconds": round(seconds, 1), "log": os.path.basename(log_path)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for every result file")
    parser.add_argument("--quick", action="store_true", help="benchmarks at their first GPU shape only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device (a CUDA build of torch and a GPU are needed)")
    out = os.path.abspath(_output_folder(args))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "environment.json"), "w") as f:
        json.dump(_environment(), f, indent=1)
    steps = [_step("gpu tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                                 f"--junitxml={os.path.join(out, 'gpu-tests.xml')}", "tests"],
                   TEST_LIMIT_S, os.path.join(out, "gpu-tests.log"))]
    for name, limit_s in BENCHMARKS:
        command = [sys.executable, os.path.join(HERE, f"bench_{name}.py"), "--device", "cuda", "--samples", "5",
                   "--dtypes", "float32,bfloat16", "--out", os.path.join(out, f"{name}.json")]
        steps.append(_step(f"bench_{name}", command + (["--quick"] if args.quick else []), limit_s,
                           os.path.join(out, f"{name}.log")))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(steps, f, indent=1)
    print(f"\n{'step':<18}{'status':<28}{'seconds':>8}")
    for s in steps:
        print(f"{s['step']:<18}{s['status']:<28}{s['seconds']:>8.0f}")
    print(f"\nresults in {out}")
    sys.exit(0 if all(s["status"] == "passed" for s in steps) else 1)


if __name__ == "__main__":
    main()
