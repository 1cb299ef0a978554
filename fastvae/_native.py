"""The native backend: the C++ extension of the best instruction-set level this CPU runs.

setup.py builds ``fastvae._C_<level>`` for every level of fastvae/_cpu_isa.py; this
module loads the highest one whose CPU features are present (checked by
``fastvae._cpu_features``, itself built for the baseline) and re-exports its
functions. ``FASTVAE_CPU_ISA=<level>`` forces a level, e.g. ``baseline`` to run the
portable kernels on any CPU; one the CPU lacks, or one not built, is an ImportError
saying so, which leaves the native backend unavailable with that reason (``python -m
fastvae`` prints it).
"""
import importlib
import os
import platform

from . import _cpu_isa
from ._cpu_features import cpu_features


def runnable_levels():
    """Names of the levels this CPU runs, lowest first."""
    features = set(cpu_features())
    return [level.name for level in _cpu_isa.levels() if set(level.features) <= features]


def _load():
    names = [level.name for level in _cpu_isa.levels()]
    runnable = runnable_levels()
    forced = os.environ.get("FASTVAE_CPU_ISA")
    if forced:
        if forced not in names:
            raise ImportError(f"FASTVAE_CPU_ISA={forced!r} is not a level of {platform.machine()}: use one of "
                              f"{', '.join(names)}")
        if forced not in runnable:
            raise ImportError(f"FASTVAE_CPU_ISA={forced!r}: this CPU lacks its features; it runs "
                              f"{', '.join(runnable)}")
        runnable = runnable[:runnable.index(forced) + 1]
    for name in reversed(runnable):  # best first; a level not built falls through
        try:
            return name, importlib.import_module(f"fastvae._C_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fastvae._C_{name}":
                raise
        if forced:
            raise ImportError(f"FASTVAE_CPU_ISA={forced!r}: fastvae was built without that level "
                              "(FASTVAE_CPU_ISA_BUILD at build time); rebuild with all levels")
    raise ImportError(f"no level of the native extension that this CPU runs ({', '.join(runnable)}) was built")


LEVEL, _module = _load()
globals().update({name: value for name, value in vars(_module).items() if not name.startswith("_")})
