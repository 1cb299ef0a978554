"""Test helpers: per-dtype tolerances, comparison against the float64 reference."""
import pytest
import torch

from fastvae import _backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) of an output in this dtype against the float64 reference: the output's own
# rounding plus float32 arithmetic inside.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def requires(backend, *ops):
    """Skip when ``backend`` does not implement all of ``ops`` (yet)."""
    missing = [op for op in ops if op not in _backend.implementations(backend)]
    if missing:
        pytest.skip(f"backend {backend!r} does not implement {', '.join(missing)}")


def requires_on(backend, device_type, *ops, dtype=torch.float32):
    """Skip unless ``backend`` runs all of ``ops`` on ``device_type`` tensors here: it
    implements them, runs that device, and has a kernel there for each (native CUDA
    builds have CUDA kernels for some ops only)."""
    reasons = [reason for op in ops if (reason := _backend._BACKENDS[backend].why_not(op, device_type, dtype))]
    if reasons:
        pytest.skip(f"backend {backend!r} on {device_type}: {reasons[0]}")


def as64(*tensors):
    return [None if t is None else t.detach().to(torch.float64) for t in tensors]


def assert_close(actual, expected, dtype, scale=1.0, msg=""):
    """``actual`` (a backend's output in ``dtype``) against ``expected`` (float64 reference)."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.detach().to(torch.float64), expected.detach().to(torch.float64),
                               atol=atol * scale, rtol=rtol * scale, msg=lambda m: f"{msg}\n{m}" if msg else m)


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, requires_grad=False):
    t = (torch.randn(shape, dtype=torch.float32, device=device) * scale).to(dtype)  # shape () works too
    return t.requires_grad_(requires_grad)


def non_contiguous(t):
    """A non-contiguous view holding the same values as ``t``."""
    wide = torch.empty(t.shape + (2,), dtype=t.dtype, device=t.device)
    wide[..., 0] = t
    out = wide[..., 0]
    assert not out.is_contiguous() or t.numel() <= 1
    return out.requires_grad_(t.requires_grad)
