"""Launch configuration shared by the VQ kernel modules (vq.py, vq_backward.py, residual_vq.py).

One place, looked up at call time (``_launch.gpu_launch(x)``), so the tests can switch every
VQ launcher to its GPU configuration on CPU tensors with one monkeypatch.
"""
import torch


def gpu_launch(x):
    """Whether launches for ``x`` take the GPU configuration (tiles, dot precision, rounding
    bound): the tests compile and interpret that configuration on CPU."""
    return x.is_cuda


def multiprocessors(device):
    return torch.cuda.get_device_properties(device).multi_processor_count
