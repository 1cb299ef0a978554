"""Backend controls: available_backends, use_backend, set_backend, FASTVAE_BACKEND, auto."""
import os
import subprocess
import sys

import pytest
import torch

import fastvae
from fastvae import _backend
from helpers import requires

PUBLIC_CALLS = {
    "reparameterize": lambda: fastvae.reparameterize(torch.randn(4, 3), torch.randn(4, 3)),
    "gaussian_kl": lambda: fastvae.gaussian_kl(torch.randn(4, 3), torch.randn(4, 3)),
    "reparameterize_kl": lambda: fastvae.reparameterize_kl(torch.randn(4, 3), torch.randn(4, 3)),
    "gumbel_softmax": lambda: fastvae.gumbel_softmax(torch.randn(4, 3)),
    "categorical_kl": lambda: fastvae.categorical_kl(torch.randn(4, 3)),
    "nearest_code": lambda: fastvae.nearest_code(torch.randn(4, 3), torch.randn(5, 3)),
    "vector_quantize": lambda: fastvae.vector_quantize(torch.randn(4, 3), torch.randn(5, 3)),
}


def test_available_backends_lists_auto_and_torch():
    names = fastvae.available_backends()
    assert names[0] == "auto" and "torch" in names
    assert set(names) <= {"auto", "triton", "native", "torch"}
    assert set(_backend.implementations("torch")) == set(_backend.OPS)


@pytest.mark.skipif(os.environ.get("FASTVAE_NO_EXTENSION") == "1", reason="built without the extension")
def test_native_extension_builds_and_is_listed():
    # The extension is part of every install with a compiler (CI builds it): it must load.
    import fastvae._native  # noqa: F401
    assert "native" in fastvae.available_backends()


def test_use_backend_scopes_and_restores():
    assert fastvae.get_backend() == "auto"
    with fastvae.use_backend("torch"):
        assert fastvae.get_backend() == "torch"
        with fastvae.use_backend("auto"):
            assert fastvae.get_backend() == "auto"
        assert fastvae.get_backend() == "torch"
    assert fastvae.get_backend() == "auto"


def test_set_backend_is_global():
    try:
        fastvae.set_backend("torch")
        assert fastvae.get_backend() == "torch"
        with fastvae.use_backend("auto"):
            assert fastvae.get_backend() == "auto"
    finally:
        fastvae.set_backend("auto")


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="backend must be one of") as error:
        fastvae.set_backend("cuda")
    assert "environment" not in str(error.value)  # the caller named it, not FASTVAE_BACKEND
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastvae.use_backend("fast"):
            pass


def test_environment_variable_sets_the_default():
    code = "import fastvae; print(fastvae.get_backend())"
    env = dict(os.environ, FASTVAE_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


def test_unknown_backend_in_the_environment_is_named_at_the_first_call_and_in_the_report():
    # `import fastvae` and `python -m fastvae` still work; the report and each op call say what is wrong.
    env = dict(os.environ, FASTVAE_BACKEND="fastest", TRITON_INTERPRET="0")
    code = ("import torch, fastvae\n"
            "try:\n    fastvae.gaussian_kl(torch.randn(2, 3), torch.randn(2, 3))\n"
            "except ValueError as error:\n    print(error)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "got 'fastest' (from the environment variable FASTVAE_BACKEND)" in out
    report = subprocess.run([sys.executable, "-m", "fastvae"], env=env, capture_output=True, text=True,
                            check=True).stdout
    assert "selected backend: fastest (FASTVAE_BACKEND=fastest): not a backend" in report


@pytest.mark.parametrize("op", sorted(PUBLIC_CALLS))
def test_every_public_op_runs_on_every_backend(op, backend):
    requires(backend, op)
    out = PUBLIC_CALLS[op]()
    for t in out if isinstance(out, tuple) else (out,):
        assert t.is_floating_point() and torch.isfinite(t).all() or t.dtype == torch.int64


def test_explicit_backend_without_the_op_raises_clearly(monkeypatch):
    fake = type(sys)("fake_backend")
    fake.gaussian_kl = lambda *args: None
    monkeypatch.setitem(_backend._BACKENDS, "native", _backend._Backend(
        "native", "fake_backend", lambda: {"cpu"}, _backend.KERNEL_DTYPES, "test"))
    monkeypatch.setitem(sys.modules, "fake_backend", fake)
    monkeypatch.setattr(_backend, "_cache", {})
    with fastvae.use_backend("native"):
        with pytest.raises(fastvae.BackendError, match="does not implement 'reparameterize'"):
            fastvae.reparameterize(torch.randn(2), torch.randn(2))
    # auto passes the op on to the next backend that has it
    z = fastvae.reparameterize(torch.randn(2), torch.randn(2))
    assert z.shape == (2,)


def test_native_cuda_build_claims_only_ops_with_cuda_kernels(monkeypatch):
    """A CUDA build of the native extension runs CPU and CUDA tensors, but CUDA ones only for the ops
    it lists in cuda_ops(): for the others `auto` falls through and `native` says why."""
    fake = type(sys)("fastvae._native")
    fake.devices = lambda: ["cpu", "cuda"]
    fake.cuda_ops = lambda: ["reparameterize", "reparameterize_backward"]
    fake.reparameterize = fake.reparameterize_backward = fake.gumbel_softmax = lambda *args: "native"
    monkeypatch.setitem(sys.modules, "fastvae._native", fake)
    monkeypatch.setitem(_backend._BACKENDS, "native", _backend._Backend(
        "native", "fastvae._native", _backend._native_devices, _backend.KERNEL_DTYPES, "test",
        _backend._native_device_ops))
    monkeypatch.setitem(_backend._BACKENDS, "triton", _backend._Backend(  # no GPU Triton here either
        "triton", "fastvae.kernels", set, _backend.KERNEL_DTYPES, "test"))
    monkeypatch.setattr(_backend, "_cache", {})
    f32 = torch.float32
    assert _backend._resolve("native", "reparameterize", "cuda", f32) is fake.reparameterize
    assert _backend._resolve("auto", "reparameterize", "cuda", f32) is fake.reparameterize
    assert _backend._resolve("native", "gumbel_softmax", "cpu", f32) is fake.gumbel_softmax
    with pytest.raises(fastvae.BackendError, match="'native' cannot run gumbel_softmax on cuda.*"
                                                   "it has no CUDA kernel for gumbel_softmax"):
        _backend._resolve("native", "gumbel_softmax", "cuda", f32)
    from fastvae import reference
    assert _backend._resolve("auto", "gumbel_softmax", "cuda", f32) is reference.gumbel_softmax


def test_explicit_backend_that_cannot_run_the_device_raises(monkeypatch):
    monkeypatch.setattr(_backend, "_cache", {})
    monkeypatch.setitem(_backend._BACKENDS, "triton", _backend._Backend(
        "triton", "fastvae.reference", lambda: {"cuda"}, _backend.KERNEL_DTYPES, "test"))
    with fastvae.use_backend("triton"):
        with pytest.raises(fastvae.BackendError, match="cannot run cpu tensors"):
            fastvae.gaussian_kl(torch.randn(2, 2), torch.randn(2, 2))


def test_float64_goes_to_torch_under_auto_and_is_refused_by_kernel_backends():
    mu = torch.randn(3, 2, dtype=torch.float64)
    assert fastvae.gaussian_kl(mu, mu).dtype == torch.float64
    if "native" in fastvae.available_backends():
        with fastvae.use_backend("native"):
            with pytest.raises(fastvae.BackendError, match="float64"):
                fastvae.gaussian_kl(mu, mu)


def test_backends_agree_through_the_public_api(backend):
    """Same generator seed -> same sample on every backend (shared Philox stream)."""
    requires(backend, "reparameterize")
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    with fastvae.use_backend("torch"):
        expected = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(3))
    got = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
