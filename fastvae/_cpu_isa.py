"""The instruction-set levels the native backend's CPU kernels are compiled for.

setup.py compiles the extension once per level of the build's architecture, into
``fastvae._C_<level>`` with that level's flags; ``fastvae._native`` loads the best level
whose features the CPU has. This module is the one table both read, so it imports
nothing but the standard library (setup.py loads it before torch may be importable).
"""
import collections
import platform

Level = collections.namedtuple("Level", "name flags features")

# Lowest first. Each level names the CPU features (fastvae._cpu_features' names) its
# flags let the compiler use; avx2 and avx512 match PyTorch's own AVX2 and AVX512
# kernel levels. -march=x86-64 keeps -march=native or a distribution's defaults out.
_X86_64 = "-march=x86-64"
_AVX2 = ("-mavx2", "-mfma", "-mf16c")
_AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
X86_64_LEVELS = (
    Level("baseline", (_X86_64,), ()),
    Level("avx2", (_X86_64, *_AVX2), ("avx2", "fma", "f16c")),
    Level("avx512", (_X86_64, *_AVX2, *_AVX512),
          ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq")),
)
# Elsewhere one portable build: on aarch64 NEON is part of the baseline, which the
# compiler's default target already uses.
PORTABLE_LEVELS = (Level("baseline", (), ()),)


def levels(machine=None):
    """The levels of ``machine`` (default: this one's ``platform.machine()``), lowest first."""
    machine = (machine or platform.machine()).lower()
    return X86_64_LEVELS if machine in ("x86_64", "amd64") else PORTABLE_LEVELS
