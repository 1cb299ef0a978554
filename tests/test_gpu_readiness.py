"""What only a real GPU exposes, checked here as far as a CPU can: the device guard of the
Triton launches (issue 14, item 1) and 64-bit addressing in the VQ kernels (item 2).
The ``gpu``-marked tests run the same properties on CUDA devices (skipped without one)."""
import contextlib
import sys

import numpy as np
import pytest
import torch

import fastvae
from fastvae import _backend, reference
from helpers import assert_close, requires, requires_on


def test_triton_cuda_calls_run_with_the_tensors_device_current(monkeypatch):
    """Triton launches on the current device and its stream: the dispatch layer makes the
    first tensor's device current around every CUDA call of the triton backend."""
    events = []
    fake = type(sys)("fake_triton")
    fake.nearest_code = lambda x, codebook: events.append(("kernel", x.device))
    monkeypatch.setitem(sys.modules, "fake_triton", fake)
    monkeypatch.setitem(_backend._BACKENDS, "triton", _backend._Backend(
        "triton", "fake_triton", lambda: {"cpu", "cuda"}, _backend.KERNEL_DTYPES, "test", device_guard=True))
    monkeypatch.setattr(_backend, "_cache", {})

    @contextlib.contextmanager
    def recording_device(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    monkeypatch.setattr(torch.cuda, "device", recording_device)
    on_gpu1 = type("CudaTensor", (), {"device": torch.device("cuda", 1)})()
    _backend._resolve("triton", "nearest_code", "cuda", torch.float32)(on_gpu1, None)
    gpu1 = torch.device("cuda", 1)
    assert events == [("enter", gpu1), ("kernel", gpu1), ("exit", gpu1)]
    events.clear()
    _backend._resolve("auto", "nearest_code", "cuda", torch.float32)(on_gpu1, None)
    assert events[0] == ("enter", gpu1)
    events.clear()  # CPU calls (the interpreter) take no guard: nothing added to that path
    _backend._resolve("triton", "nearest_code", "cpu", torch.float32)(torch.zeros(1), None)
    assert events == [("kernel", torch.device("cpu"))]


def _every_op(device, dtype=torch.float32):
    """(name, callable) of a forward+backward of every public op on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device, dtype).requires_grad_()

    def step(fn, *inputs):
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs if o.is_floating_point()).backward()
        return [o.detach() for o in outs] + [t.grad for t in inputs]

    mu, logvar, logits, x, codebook = leaf(64, 40), leaf(64, 40), leaf(48, 70), leaf(300, 24), leaf(50, 24)
    return {
        "reparameterize": lambda: step(lambda a, b: fastvae.reparameterize(a, b), mu, logvar),
        "gaussian_kl": lambda: step(lambda a, b: fastvae.gaussian_kl(a, b), mu, logvar),
        "reparameterize_kl": lambda: step(lambda a, b: fastvae.reparameterize_kl(a, b), mu, logvar),
        "gumbel_softmax": lambda: step(lambda a: fastvae.gumbel_softmax(a, 0.5, hard=True), logits),
        "categorical_kl": lambda: step(lambda a: fastvae.categorical_kl(a), logits),
        "vector_quantize": lambda: step(lambda a, b: fastvae.vector_quantize(a, b), x, codebook),
    }


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend_name", ["triton", "native"])
def test_ops_on_the_second_gpu_match_the_first(backend_name):
    """Tensors on cuda:1 while cuda:0 is current: same results as on cuda:0 (same seeds)."""
    if backend_name not in fastvae.available_backends():
        pytest.skip(f"{backend_name} not available")
    results = {}
    for device in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0), fastvae.use_backend(backend_name):
            for op, run in _every_op(device).items():
                if _backend._BACKENDS[backend_name].why_not(op, "cuda", torch.float32):
                    continue
                torch.manual_seed(1)
                results[device, op] = [t.cpu() for t in run()]
        torch.cuda.synchronize(device)
    for (device, op), outs in results.items():
        if device == "cuda:1":
            for got, expected in zip(outs, results["cuda:0", op]):
                torch.testing.assert_close(got, expected, msg=op)


@pytest.fixture
def vq_tile_products(monkeypatch):
    """Records, per VQ kernel run under the interpreter, the NumPy dtype of every integer
    product over a tile (``row * D``, ``code * D``: the only ones these kernels form)."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if "cpu" not in _backend._BACKENDS["triton"].devices():
        pytest.skip("needs the Triton interpreter")
    products, running = {}, []
    original_run, original_mul = interpreter.InterpretedFunction.run, interpreter.InterpreterBuilder.create_mul

    def run(self, *args, **kwargs):
        running.append(self.fn.__name__ if self.fn.__module__ == "fastvae.kernels.vq" else None)
        try:
            return original_run(self, *args, **kwargs)
        finally:
            running.pop()

    def mul(self, lhs, rhs):
        out = original_mul(self, lhs, rhs)
        if running and running[-1] and out.data.ndim >= 1 and out.data.size > 1 and out.data.dtype.kind in "iu":
            products.setdefault(running[-1], set()).add(out.data.dtype)
        return out

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_mul", mul)
    return products


@pytest.mark.parametrize("deterministic", [False, True])
def test_vq_kernels_address_rows_and_codes_in_64_bits(vq_tile_products, deterministic):
    """``row * D`` in int32 wraps once N * D >= 2^31 (8.4M rows at D = 256): every tile
    offset of the search, finish and backward kernels is computed in int64."""
    requires_on("triton", "cpu", "vector_quantize", "vector_quantize_backward")
    x = torch.randn(70, 20, requires_grad=True)
    codebook = torch.randn(30, 20, requires_grad=True)
    torch.use_deterministic_algorithms(deterministic)
    try:
        with fastvae.use_backend("triton"):
            quantized, _, loss = fastvae.vector_quantize(x, codebook)
            (quantized.sum() + loss).backward()
    finally:
        torch.use_deterministic_algorithms(False)
    expected_kernels = {"_search_kernel", "_finish_kernel", "_grad_x_kernel",
                        "_grad_codebook_sorted_kernel" if deterministic else "_grad_codebook_atomic_kernel"}
    assert set(vq_tile_products) >= expected_kernels
    narrow = {name: dtypes for name, dtypes in vq_tile_products.items() if dtypes != {np.dtype(np.int64)}}
    assert not narrow, f"32-bit address products in {narrow}"


@pytest.mark.gpu
@pytest.mark.slow
def test_vq_past_2_to_the_31_elements_matches_the_reference_on_the_last_rows():
    """N * D > 2^31 on a GPU (bfloat16, 4.3 GB per (N, D) tensor): the last rows, whose
    offsets pass 2^31, get the reference's codes and gradients."""
    requires_on("triton", "cuda", "vector_quantize", "vector_quantize_backward")
    d, k = 256, 64
    n = 2**31 // d + 1000
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    codebook = torch.randn(k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with fastvae.use_backend("triton"):
        quantized, indices, loss = fastvae.vector_quantize(x, codebook)
        quantized.float().sum().backward()
    tail = x.detach()[-4096:]
    expected_indices, _ = reference.nearest_code(tail, codebook.detach())
    assert torch.equal(indices[-4096:], expected_indices)
    assert torch.equal(quantized.detach()[-4096:], codebook.detach()[expected_indices])
    assert torch.equal(x.grad[-4096:], torch.ones_like(tail))  # straight-through of quantized.sum()
    del x, quantized
    torch.cuda.empty_cache()


@pytest.fixture
def gpu_vq_configuration(monkeypatch):
    """The VQ launchers take their CUDA configuration (64-row tiles, ``tf32x3`` dots, the
    CUDA rounding bound, an H100's 132 SMs) on CPU tensors, run by the interpreter."""
    requires_on("triton", "cpu", "vector_quantize", "vector_quantize_backward")
    import fastvae.kernels.vq as vq_kernels

    monkeypatch.setattr(vq_kernels, "_gpu_launch", lambda x: True)
    monkeypatch.setattr(vq_kernels, "_multiprocessors", lambda device: 132)
    _interpret_bfloat16_dots(monkeypatch)
    return vq_kernels


def _interpret_bfloat16_dots(monkeypatch):
    """The interpreter keeps bfloat16 as its uint16 bits and multiplies those in tl.dot (a
    GPU multiplies the values): widen bfloat16 operands to float32 first, exactly."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        values = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(values, tl.float32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, *rest: original(self, widen(a), widen(b), *rest))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,d", [(130, 70, 8), (70, 300, 64), (20, 40, 256)])
def test_vq_gpu_configuration_matches_the_reference(gpu_vq_configuration, n, k, d, dtype):
    """The CUDA branch's numerics (D <= and > BLOCK_D, code splits, near-ties and exact
    duplicates), forward and backward, against the float64 oracle and the reference."""
    from test_vq import assert_nearest, clustered

    x, codebook = clustered(n, k, d, dtype)
    x.requires_grad_(), codebook.requires_grad_()
    with fastvae.use_backend("triton"):
        quantized, indices, loss = fastvae.vector_quantize(x, codebook)
        grads = torch.autograd.grad(quantized.float().sum() + 3 * loss.float(), (x, codebook))
        assert_nearest(*fastvae.nearest_code(x, codebook), x, codebook)
    assert_nearest(indices, ((quantized.double() - x.double()) ** 2).sum(1).to(dtype), x, codebook)
    expected = reference.vector_quantize_backward(torch.ones_like(quantized), torch.tensor(3.0, dtype=dtype),
                                                  x.detach().double(), codebook.detach().double(), indices, 0.25)
    for got, want in zip(grads, expected):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype,dot", [(torch.float32, ("tf32x3", False)), (torch.float16, ("ieee", True)),
                                       (torch.bfloat16, ("ieee", True))])
def test_vq_gpu_search_dots_16bit_inputs_natively(gpu_vq_configuration, monkeypatch, dtype, dot):
    """16-bit values are exact in tf32, so tf32x3's extra passes add nothing: a float16 or
    bfloat16 search dots the tiles as loaded (float32 accumulation), float32 as tf32x3,
    each with its own error bound (the truncating model of ``kernels/vq.py``)."""
    from triton.runtime.interpreter import InterpretedFunction

    searches = []
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        if self.fn.__name__ == "_search_kernel":
            searches.append((kwargs["PRECISION"], kwargs["DOT_16BIT"]))
        elif self.fn.__name__ == "_finish_kernel":
            searches.append(args[13])  # rounding
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    with fastvae.use_backend("triton"):
        fastvae.nearest_code(torch.randn(10, 64, dtype=dtype), torch.randn(20, 64, dtype=dtype))
    u = 2.0**-24
    assert searches == [dot, (2 * 64 + 4 + (0 if dot[1] else 48)) * u]
