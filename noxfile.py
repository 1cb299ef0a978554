"""The project's two jobs, each on a fresh machine with nothing but Python and pip:

    python -m pip install nox && python -m nox -s bench   # the benchmark suite: tables, JSON, figures
    python -m pip install nox && python -m nox -s tests   # the test suite
    python -m nox -s gpu                                    # on a CUDA machine: gpu tests + GPU benchmarks
    python -m pip install nox && python -m nox -s wheel   # the wheel, tested at the baseline level

Both reuse a torch that is already installed (the venv sees the system site-packages);
where none is, they install ``torch==2.13.0`` (on the project's CPU machines the local
CPU build), never an unpinned torch. The extension is built with --no-build-isolation
against that torch.
"""
import glob
import os

import nox

nox.options.default_venv_backend = "venv"
TORCH_PIN = "torch==2.13.0"


def _install_requirements(session, extras):
    probe = "import importlib.util; print('torch' if importlib.util.find_spec('torch') else 'none')"
    if "torch" not in session.run("python", "-c", probe, silent=True):
        session.install(TORCH_PIN)
    session.install("numpy", "setuptools", "wheel", "pybind11", "ninja", *extras)


def _install(session, extras, build_env=None):
    _install_requirements(session, extras)
    session.install("--no-build-isolation", "-e", ".", env=build_env)
    session.run("python", "-c", "import fastvae; print('fastvae backends:', fastvae.available_backends())")


@nox.session(venv_params=["--system-site-packages"])
def tests(session):
    """Build, then run the whole test suite (Triton kernels under the interpreter on CPU)."""
    _install(session, ["pytest", "pytest-xdist", "scipy", "triton", "vector-quantize-pytorch", "diffusers",
                       "scikit-learn", "tqdm", "matplotlib"])  # the last three: examples and figures
    session.run("python", "-m", "pytest", "-n", "2", "--durations=15", *session.posargs)


@nox.session(venv_params=["--system-site-packages"])
def bench(session):
    """Build, then run the benchmark suite on the default device (a representative suite on a
    CPU, a few minutes; ``-- --full`` for every shape), print the tables, draw the figures.
    Only the CPU's own instruction-set level is built: the benchmarks run nothing else, and
    the other two levels would triple the build."""
    _install(session, ["faiss-cpu", "vector-quantize-pytorch", "scikit-learn", "diffusers", "tqdm", "matplotlib"],
             build_env={"FASTVAE_CPU_ISA_BUILD": "native"})
    session.run("python", "benchmarks/run_all.py", *session.posargs)


@nox.session(venv_params=["--system-site-packages"], default=False)  # only when asked for: needs a GPU
def gpu(session):
    """On a CUDA machine: build against the installed CUDA torch (installing nothing else),
    run the gpu-marked tests, then every benchmark at its GPU shapes in float32 and
    bfloat16; all result files go to one folder ($OUT, else benchmarks/results/gpu-<gpu>-<date>/).
    See benchmarks/gpu_check.py."""
    session.install("--no-build-isolation", "--no-deps", "-e", ".")
    session.run("python", "benchmarks/gpu_check.py", *session.posargs)


@nox.session(venv_params=["--system-site-packages"], default=False)  # slow: only when asked for
def wheel(session):
    """Build the wheel a user installs, install it, and run the native op tests from the
    installed copy with FASTVAE_CPU_ISA=baseline: the portable kernels that any CPU of the
    architecture runs must import and pass. Slow (all levels are compiled): not part of `tests`."""
    _install_requirements(session, ["pytest", "scipy"])
    wheel_dir = session.create_tmp()
    for old in glob.glob(os.path.join(wheel_dir, "fastvae-*.whl")):
        os.remove(old)
    session.run("python", "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", wheel_dir, ".")
    session.install("--no-deps", "--force-reinstall", *glob.glob(os.path.join(wheel_dir, "fastvae-*.whl")))
    tests = [os.path.abspath(os.path.join("tests", name))
             for name in ("test_gaussian.py", "test_gumbel.py", "test_vq.py", "test_rng.py", "test_isa.py")]
    session.chdir(wheel_dir)  # out of the source tree: `import fastvae` finds the installed wheel
    env = {"FASTVAE_CPU_ISA": "baseline"}
    session.run("python", "-m", "fastvae", env=env)
    session.run("python", "-m", "pytest", *tests, "-q", "-k", "native or isa", "-p", "no:cacheprovider", env=env)
