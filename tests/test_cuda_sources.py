"""CUDA sources compile with nvcc (no GPU needed): csrc/philox.h is meant for device code
too, so a kernel drawing both streams is compiled for sm_90; every csrc/cuda/*.cu is
compiled for sm_90 against torch's headers with the flags a torch CUDA extension build
uses; and the C++ sources that call into csrc/cuda/ compile as a CUDA build sees them."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")

DEVICE_USE = r"""
#include "csrc/philox.h"
__global__ void draw(float* out, unsigned long long seed) {
  float normal[4], gumbel[4];
  fastvae::normal4(seed, blockIdx.x * blockDim.x + threadIdx.x, normal);
  fastvae::gumbel4(seed, blockIdx.x, threadIdx.x, gumbel);
  for (int lane = 0; lane < 4; ++lane) out[8 * threadIdx.x + lane] = normal[lane] + gumbel[lane];
}
"""

# What torch.utils.cpp_extension passes for a CUDA extension named fastvae._C (torch 2.13
# builds extensions as C++20), plus setup.py's FASTVAE_WITH_CUDA. C10_CUDA_NO_CMAKE_CONFIGURE_FILE:
# a CPU-only torch ships c10/cuda's headers without the generated
# c10/cuda/impl/cuda_cmake_macros.h, whose one macro (C10_CUDA_BUILD_SHARED_LIBS) only
# matters on Windows; this switch (meant for HIP builds) skips including it.
EXTENSION_FLAGS = ["-std=c++20", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
                   "-DFASTVAE_WITH_CUDA"] + [f"-I{path}" for path in cpp_extension.include_paths()]
NVCC_FLAGS = ["-arch=sm_90", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *cpp_extension.COMMON_NVCC_FLAGS]


@needs_nvcc
def test_philox_header_compiles_for_the_device(tmp_path):
    source = tmp_path / "draw.cu"
    source.write_text(DEVICE_USE)
    result = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-I", ROOT, "-c", str(source), "-o",
                             str(tmp_path / "draw.o")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


@needs_nvcc
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    result = subprocess.run(["nvcc", "-c", *EXTENSION_FLAGS, *NVCC_FLAGS, source, "-o", str(tmp_path / "out.o")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "csrc/cuda" not in result.stderr, result.stderr  # no warnings in our own code either


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_host_sources_compile_with_cuda_dispatch():
    """gaussian.cpp hands CUDA tensors to csrc/cuda/ and fastvae.cpp lists cuda_ops() only
    under FASTVAE_WITH_CUDA, which this (CPU) build never defines: check that variant."""
    sources = [os.path.join(ROOT, "csrc", "fastvae.cpp"), os.path.join(ROOT, "csrc", "cpu", "gaussian.cpp")]
    result = subprocess.run([os.environ.get("CXX", "c++"), "-fsyntax-only", *EXTENSION_FLAGS,
                             f"-I{sysconfig.get_paths()['include']}", *sources],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
