"""Build fastvae. The C++ extension fastvae._C is optional: without a C++ compiler (or
with FASTVAE_NO_EXTENSION=1) the package installs without the `native` backend.

Build against the torch already installed: pip install --no-build-isolation -e .
"""
import glob
import os
import shutil

from setuptools import setup


def extension_modules():
    if os.environ.get("FASTVAE_NO_EXTENSION") == "1" or shutil.which(os.environ.get("CXX", "c++")) is None:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastvae: torch is not importable at build time, so the native extension is skipped; "
              "install torch first and build with: pip install --no-build-isolation -e .")
        return [], {}

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-math-errno / -fno-trapping-math: loops calling sqrt or holding float selects
    # vectorise (errno and FP exception flags are never read); rounding is unchanged.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("FASTVAE_PORTABLE") != "1":
        cxx_flags.append("-march=native")  # built where it runs (pip install -e .)
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        # No --use_fast_math: it swaps logf/sinf/cosf in philox.h's normal4 for approximations
        # off by ~1e-6 x the Box-Muller radius, which takes CUDA noise out of the shared
        # stream's test tolerance. The kernels are memory-bound, so the precise functions
        # should cost little (not yet measured on a GPU).
        extension = cpp_extension.CUDAExtension(
            "fastvae._C", sources + cuda_sources, define_macros=[("FASTVAE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    else:
        extension = cpp_extension.CppExtension("fastvae._C", sources, extra_compile_args={"cxx": cxx_flags},
                                               extra_link_args=["-fopenmp"])
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="fastvae",
    version="0.1.0",
    description="Fused kernels for the stochastic layers of VAE-family models",
    packages=["fastvae", "fastvae.ops", "fastvae.nn", "fastvae.kernels"],
    package_dir={"fastvae.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=7", "pytest-xdist", "scipy", "triton>=3.2"],
        "bench": ["faiss-cpu", "vector-quantize-pytorch", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
