"""The CUDA side of the shared headers compiles with nvcc (no GPU needed): csrc/philox.h
is meant for device code too, so a kernel drawing both streams is compiled for sm_90."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEVICE_USE = r"""
#include "csrc/philox.h"
__global__ void draw(float* out, unsigned long long seed) {
  float normal[4], gumbel[4];
  fastvae::normal4(seed, blockIdx.x * blockDim.x + threadIdx.x, normal);
  fastvae::gumbel4(seed, blockIdx.x, threadIdx.x, gumbel);
  for (int lane = 0; lane < 4; ++lane) out[8 * threadIdx.x + lane] = normal[lane] + gumbel[lane];
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_philox_header_compiles_for_the_device(tmp_path):
    source = tmp_path / "draw.cu"
    source.write_text(DEVICE_USE)
    result = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-I", ROOT, "-c", str(source), "-o",
                             str(tmp_path / "draw.o")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
