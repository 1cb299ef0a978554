"""The native backend's instruction-set levels (fastvae/_cpu_isa.py): the best level the
CPU runs is loaded, FASTVAE_CPU_ISA forces a lower one or says clearly why it cannot,
and the native tests pass at every level this machine runs.

The test run itself exercises the best level; the lower ones run a representative subset
of the op tests in a subprocess each, so the portable baseline build is tested on every
CI run without multiplying the suite's time.
"""
import os
import subprocess
import sys

import pytest

import fastvae
from fastvae import _backend, _cpu_isa

native = _backend._BACKENDS["native"].module()
pytestmark = pytest.mark.skipif(native is None, reason="built without the native extension")
RUNNABLE = native.runnable_levels() if native is not None else []
# The op tests run at each level below this run's: every kernel of the three columns and the raw streams.
LOWER = RUNNABLE[:RUNNABLE.index(native.LEVEL)] if native is not None else []
LEVEL_TESTS = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
               for name in ("test_gaussian.py", "test_gumbel.py", "test_vq.py", "test_rng.py")]
# The subprocesses import the fastvae this run imports (the source tree or an installed wheel).
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastvae.__file__)))


def _run(level, *args):
    env = dict(os.environ, FASTVAE_CPU_ISA=level)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=IMPORT_ROOT,
                          timeout=1800)


def test_the_best_level_the_cpu_runs_is_loaded():
    if "FASTVAE_CPU_ISA" in os.environ:
        pytest.skip("FASTVAE_CPU_ISA forces the level of this run")
    assert RUNNABLE[0] == "baseline" and native.LEVEL == RUNNABLE[-1]
    assert [name for name in sys.modules if name.startswith("fastvae._C_")] == [f"fastvae._C_{native.LEVEL}"]


@pytest.mark.parametrize("level", RUNNABLE)
def test_fastvae_cpu_isa_selects_the_level(level):
    code = ("import sys, fastvae._native as n; "
            "print(n.LEVEL, *sorted(m for m in sys.modules if m.startswith('fastvae._C_')))")
    result = _run(level, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [level, f"fastvae._C_{level}"]  # that level's module only
    report = _run(level, "-m", "fastvae")
    assert report.returncode == 0, report.stderr
    assert f"CPU level: {level} (this CPU runs {', '.join(RUNNABLE)}; FASTVAE_CPU_ISA={level})" in report.stdout


def test_an_unknown_level_is_named_in_the_reason_native_is_unavailable():
    report = _run("sse9", "-m", "fastvae")
    names = ", ".join(level.name for level in _cpu_isa.levels())
    assert "native: unavailable" in report.stdout
    assert "FASTVAE_CPU_ISA='sse9' is not a level of" in report.stdout and f"use one of {names}" in report.stdout


def test_a_level_the_cpu_lacks_is_refused_before_its_module_loads(monkeypatch):
    monkeypatch.setattr(native, "cpu_features", lambda: [])  # a CPU with the baseline only
    monkeypatch.setenv("FASTVAE_CPU_ISA", _cpu_isa.levels()[-1].name)
    if len(_cpu_isa.levels()) == 1:
        pytest.skip("this architecture has one level")
    with pytest.raises(ImportError, match="this CPU lacks its features; it runs baseline"):
        native._load()


@pytest.mark.parametrize("level", LOWER)
def test_native_ops_pass_at_lower_level(level):
    result = _run(level, "-m", "pytest", *LEVEL_TESTS, "-q", "-x", "-k", "native", "-p", "no:cacheprovider")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
