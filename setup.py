"""Build fastvae. The C++ extension is optional: without a C++ compiler (or with
FASTVAE_NO_EXTENSION=1) the package installs without the `native` backend.

Build against the torch already installed: pip install --no-build-isolation -e .

The CPU kernels are compiled once per instruction-set level of the architecture
(fastvae/_cpu_isa.py: baseline, avx2 and avx512 on x86-64; one portable build elsewhere),
each into a module of its own, fastvae._C_<level>, from the same sources; at import
fastvae._native loads the best level the CPU runs (FASTVAE_CPU_ISA=<level> forces a
lower one), as PyTorch does for its own kernels. A module per level, rather than
per-level namespaces in one library, keeps every inline function of the torch headers
compiled at one level per module, so no AVX-512 copy can be linked into baseline code;
the price is build time and wheel size, three times one module's. While developing,
FASTVAE_CPU_ISA_BUILD=native builds only the build machine's best level (or name
levels: FASTVAE_CPU_ISA_BUILD=baseline,avx2).
"""
import glob
import importlib.util
import os
import shutil

from setuptools import Extension, setup


def _isa_levels():
    # fastvae/_cpu_isa.py by path: importing the fastvae package would need torch.
    spec = importlib.util.spec_from_file_location("_cpu_isa", os.path.join("fastvae", "_cpu_isa.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.levels()


def _levels_to_build(levels):
    wanted = os.environ.get("FASTVAE_CPU_ISA_BUILD", "all")
    if wanted == "all":
        return levels
    if wanted == "native":
        flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
        return [[level for level in levels if set(level.features) <= flags][-1]]
    names = wanted.split(",")
    unknown = sorted(set(names) - {level.name for level in levels})
    if unknown:
        raise SystemExit(f"FASTVAE_CPU_ISA_BUILD: unknown level(s) {unknown}; this architecture has "
                         f"{[level.name for level in levels]} (or 'all', 'native')")
    return [level for level in levels if level.name in names]


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
    # -g0: debug info tripled the build time of three modules and their size.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math", "-g0"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    extensions = [Extension("fastvae._cpu_features", ["csrc/cpu_features.c"])]
    for level in _levels_to_build(_isa_levels()):
        name, flags = f"fastvae._C_{level.name}", {"cxx": cxx_flags + list(level.flags)}
        if with_cuda:
            # No --use_fast_math: it swaps logf/sinf/cosf in philox.h's normal4 for approximations
            # off by ~1e-6 x the Box-Muller radius, which takes CUDA noise out of the shared
            # stream's test tolerance. The kernels are memory-bound, so the precise functions
            # should cost little (not yet measured on a GPU).
            extensions.append(cpp_extension.CUDAExtension(
                name, sources + cuda_sources, define_macros=[("FASTVAE_WITH_CUDA", None)],
                extra_compile_args={**flags, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=["-fopenmp"]))
        else:
            extensions.append(cpp_extension.CppExtension(name, sources, extra_compile_args=flags,
                                                         extra_link_args=["-fopenmp"]))

    class BuildPerLevel(cpp_extension.BuildExtension):
        """Builds each level's module in a build directory of its own (same sources, other
        flags), and compiles the CUDA sources once: later levels link the first one's objects."""
        cuda_objects = None

        def build_extension(self, ext):
            shared_temp = self.build_temp
            self.build_temp = os.path.join(shared_temp, ext.name)
            cu = [source for source in ext.sources if source.endswith(".cu")]
            if cu and self.cuda_objects is not None:
                ext.sources = [source for source in ext.sources if source not in cu]
                ext.extra_objects = list(ext.extra_objects or []) + self.cuda_objects
            try:
                super().build_extension(ext)
                if cu and self.cuda_objects is None:
                    self.cuda_objects = self.compiler.object_filenames(cu, output_dir=self.build_temp)
            finally:
                self.build_temp = shared_temp

    return extensions, {"build_ext": BuildPerLevel}


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
