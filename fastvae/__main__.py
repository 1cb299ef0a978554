"""``python -m fastvae``: what a bug report needs, in one paste.

Versions, every backend with the reason a missing one is missing, the CPU the native
kernels run on, threads, the fastvae settings in the environment, and the CUDA devices.
"""
import importlib.metadata
import os
import platform
import sys

import torch

from . import __version__, _backend


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _backend_lines():
    for name, backend in _backend._BACKENDS.items():
        if backend.module() is None:
            yield f"{name}: unavailable ({backend._hint}: {backend.load_error})"
            continue
        devices = sorted(backend.devices())
        if not devices:
            yield f"{name}: loaded, but runs no device here ({backend._hint})"
            continue
        ops = _backend.implementations(name)
        yield f"{name}: runs {', '.join(devices)}; {len(ops)} of {len(_backend.OPS)} backend functions"
        if name == "native":
            native = backend.module()
            yield (f"  CPU level: {native.LEVEL} (this CPU runs {', '.join(native.runnable_levels())}; "
                   f"FASTVAE_CPU_ISA={os.environ.get('FASTVAE_CPU_ISA', 'unset')})")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith(("flags", "Features"))),
                         [])
    except OSError:
        return "unknown"
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "neon", "asimd", "sve")
    return " ".join(flag for flag in wanted if flag in flags) or "none of interest"


def report():
    """The lines of the report, as printed by ``python -m fastvae``."""
    backend = _backend.get_backend()
    lines = [
        f"fastvae {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {_version('triton')}, "
        f"numpy {_version('numpy')}",
        f"selected backend: {backend} (FASTVAE_BACKEND={os.environ.get('FASTVAE_BACKEND', 'unset')})"
        + ("" if backend in _backend.NAMES
           else f": not a backend (one of {', '.join(_backend.NAMES)}), so every op call raises ValueError"),
        "backends:",
        *(f"  {line}" for line in _backend_lines()),
        f"cpu: {platform.machine()} {platform.processor() or ''}".rstrip()
        + f"; features: {_cpu_flags()}; torch's CPU capability: {torch.backends.cpu.get_cpu_capability()}",
        f"threads: torch {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cores visible {os.cpu_count()}",
        "settings: " + (", ".join(f"{key}={value}" for key, value in sorted(os.environ.items())
                                  if key.startswith("FASTVAE_") or key == "TRITON_INTERPRET") or "none"),
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"cuda:{index}: {props.name}, sm_{props.major}{props.minor}, "
                         f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    else:
        lines.append("cuda: no device visible to torch")
    return lines


if __name__ == "__main__":
    print("\n".join(report()))
    sys.exit(0)
