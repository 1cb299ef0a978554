"""What only a real GPU exposes, checked here as far as a CPU can: the device guard of the
Triton launches (issue 14, item 1), 64-bit addressing in the VQ kernels (item 2) and the
size-based choice between native and Triton CUDA kernels (item 9).
The ``gpu``-marked tests run the same properties on CUDA devices (skipped without one)."""
import contextlib
import sys

import numpy as np
import pytest
import torch

import fastvae
from fastvae import _backend, reference
from helpers import assert_close, requires, requires_on

VQ_KERNEL_MODULES = ("fastvae.kernels.vq", "fastvae.kernels.vq_backward", "fastvae.kernels.residual_vq")


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


def _fake_backend(monkeypatch, name, events, cuda_ops=None, device_guard=False):
    """Replace backend ``name`` by a module whose ops record (name, op) in ``events``;
    ``cuda_ops``: the ops it has CUDA kernels for (None: all)."""
    module = type(sys)(f"fake_{name}")
    for op in ("reparameterize", "gaussian_kl_backward", "nearest_code"):
        setattr(module, op, lambda *args, op=op: events.append((name, op)))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    device_ops = None if cuda_ops is None else (lambda: {"cuda": frozenset(cuda_ops)})
    monkeypatch.setitem(_backend._BACKENDS, name, _backend._Backend(
        name, module.__name__, lambda: {"cpu", "cuda"}, _backend.KERNEL_DTYPES, "test", device_ops, device_guard))


def test_auto_on_cuda_prefers_the_native_kernel_for_small_tensors(monkeypatch):
    """Triton's Python launch dwarfs a small kernel: below ``SMALL_CUDA_NUMEL`` elements of
    the op's work tensor, ``auto`` runs the native CUDA kernel where there is one."""
    events = []
    _fake_backend(monkeypatch, "triton", events, device_guard=True)
    _fake_backend(monkeypatch, "native", events, cuda_ops={"reparameterize", "gaussian_kl_backward"})
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_backend, "_cache", {})
    monkeypatch.setattr(_backend, "SMALL_CUDA_NUMEL", 1000)

    def cuda_tensor(numel):
        return type("CudaTensor", (), {"device": torch.device("cuda", 0), "dtype": torch.float32,
                                       "numel": lambda self: numel})()

    small, large = cuda_tensor(999), cuda_tensor(1000)
    for tensor in (small, large, small):
        _backend.lookup("reparameterize", tensor)(tensor, tensor, None)
    # A reduced KL's gradient is a scalar: the size is mu's, the second argument.
    _backend.lookup("gaussian_kl_backward", cuda_tensor(1))(cuda_tensor(1), large, large, None, None, "sum")
    _backend.lookup("gaussian_kl_backward", cuda_tensor(1))(cuda_tensor(1), small, small, None, None, "sum")
    _backend.lookup("nearest_code", small)(small, small)  # no native CUDA kernel: Triton at any size
    assert events == [("native", "reparameterize"), ("triton", "reparameterize"), ("native", "reparameterize"),
                      ("triton", "gaussian_kl_backward"), ("native", "gaussian_kl_backward"),
                      ("triton", "nearest_code")]
    events.clear()
    with fastvae.use_backend("triton"):  # an explicit backend is never swapped
        _backend.lookup("reparameterize", small)(small, small, None)
    _backend.lookup("reparameterize", torch.zeros(3))(torch.zeros(3), None, None)  # CPU: native, no size test
    assert events == [("triton", "reparameterize"), ("native", "reparameterize")]
    assert _backend.lookup("reparameterize", torch.zeros(3)) is sys.modules["fake_native"].reparameterize


def test_small_follow_up_ops_are_folded_into_the_kernels(monkeypatch):
    """On a GPU each small PyTorch op around a Triton launch is a launch of its own: a KL
    reduced within one block is written by its kernel (no second summing launch), and the
    VQ forward's codebook norms and loss (sum, scale, cast) are kernels, not PyTorch ops."""
    requires_on("triton", "cpu", "gaussian_kl", "vector_quantize")
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    import fastvae.kernels as kernels

    launches, run = [], InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    class TorchOps(TorchDispatchMode):  # records the PyTorch ops run
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    mu, logvar = torch.randn(8, 100), torch.randn(8, 100)
    kl = kernels.gaussian_kl(mu, logvar, None, None, "batchmean")
    assert launches == ["_forward_kernel"]
    assert_close(kl, reference.gaussian_kl(mu.double(), logvar.double(), None, None, "batchmean"), torch.float32)
    x, codebook = torch.randn(70, 8), torch.randn(20, 8)
    ops = set()
    with TorchOps():
        quantized, indices, loss = kernels.vector_quantize(x, codebook, 0.25)
    arithmetic = {"add", "sub", "mul", "div", "sum", "max", "amax", "_to_copy"}  # (the interpreter copies)
    assert not ops & arithmetic, f"PyTorch ops around the VQ kernels: {ops & arithmetic}"
    expected = reference.vector_quantize(x.double(), codebook.double(), 0.25)
    assert torch.equal(indices, expected[1])
    assert_close(loss, expected[2], torch.float32)


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
        running.append(self.fn.__name__ if self.fn.__module__ in VQ_KERNEL_MODULES else None)
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
    offset of the search, finish and backward kernels (straight-through, rotation, residual)
    is computed in int64."""
    requires_on("triton", "cpu", "vector_quantize", "vector_quantize_backward")
    x = torch.randn(70, 20, requires_grad=True)
    codebook = torch.randn(30, 20, requires_grad=True)
    torch.use_deterministic_algorithms(deterministic)
    try:
        with fastvae.use_backend("triton"):
            for estimator in ("ste", "rotation"):
                quantized, _, loss = fastvae.vector_quantize(x, codebook, estimator=estimator)
                (quantized.sum() + loss).backward()
            quantized, _, losses = fastvae.residual_quantize(x, torch.stack([codebook, codebook]))
            (quantized.sum() + losses.sum()).backward()
    finally:
        torch.use_deterministic_algorithms(False)
    expected_kernels = {"_codebook_kernel", "_search_kernel", "_resolve_kernel", "_grad_x_kernel",
                        "_grad_codebook_sorted_kernel" if deterministic else "_grad_codebook_atomic_kernel",
                        "_grad_x_rotation_kernel", "_residual_backward_kernel"}
    if deterministic:
        expected_kernels.add("_stage_sums_kernel")
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
    import fastvae.kernels._launch as vq_launch
    import fastvae.kernels.vq as vq_kernels

    monkeypatch.setattr(vq_launch, "gpu_launch", lambda x: True)
    monkeypatch.setattr(vq_launch, "multiprocessors", lambda device: 132)
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
    each with its own error bound (the truncating model of ``kernels/vq.py``; 16-bit values
    are dotted uncentred, since centred ones would not be exact in 16 bits)."""
    from triton.runtime.interpreter import InterpretedFunction

    searches = []
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        if self.fn.__name__ == "_search_kernel":
            searches.append((kwargs["PRECISION"], kwargs["DOT_16BIT"]))
        elif self.fn.__name__ == "_resolve_kernel":
            searches.append(args[16])  # rounding
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    with fastvae.use_backend("triton"):
        fastvae.nearest_code(torch.randn(10, 64, dtype=dtype), torch.randn(20, 64, dtype=dtype))
    u = 2.0**-24
    assert searches == [dot, (2 * 64 + 4 + (0 if dot[1] else 48 + 2)) * u]  # + 2: float32 centring


# ---------------------------------------------------------------- the tf32x3 error bound (item 7)
def _chop_to_float32(values):
    """float64 values truncated (rounded toward zero) to float32."""
    nearest = values.astype(np.float32)
    overshoot = np.abs(nearest.astype(np.float64)) > np.abs(values)
    return np.where(overshoot, np.nextafter(nearest, np.float32(0)), nearest)


def _chop_to_tf32(values):
    """float32 values with the 13 mantissa bits tf32 lacks cleared (truncated)."""
    return (np.ascontiguousarray(values, np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _truncating_tf32x3_dot(a, b, acc):
    """acc + a @ b as the module docstring of kernels/vq.py models Hopper's tf32x3 at its
    worst: hi = tf32(a) and lo = a - hi both truncated to tf32, the passes lo.hi, hi.lo,
    hi.hi (products exact), and the float32 accumulator truncated after every addition."""
    a_hi, b_hi = _chop_to_tf32(a), _chop_to_tf32(b)
    a_lo, b_lo = _chop_to_tf32(a - a_hi), _chop_to_tf32(b - b_hi)
    acc = acc.astype(np.float32)
    for left, right in ((a_lo, b_hi), (a_hi, b_lo), (a_hi, b_hi)):
        for i in range(a.shape[1]):
            acc = _chop_to_float32(acc + np.outer(left[:, i], right[i]).astype(np.float64))
    return acc


def _adversarial_codes(d, rng):
    """(x, codebook) float32: every mantissa bit set (tf32 drops the most), codes in +/- pairs
    (mean 0: centring removes nothing) so that x . e sums same-signed products, and rows at
    near-ties (midpoints of two codes, nudged by less than the bound)."""
    full_mantissa = lambda shape: (rng.uniform(1, 2, shape).astype(np.float32).view(np.uint32)
                                   | np.uint32(0x1FFF)).view(np.float32)
    half = full_mantissa((24, d)) * np.float32(8.0)
    codebook = np.concatenate([half, -half])
    pairs = rng.integers(0, 24, (40, 2))
    midpoints = (codebook[pairs[:, 0]] + codebook[pairs[:, 1]]) / 2
    x = np.concatenate([midpoints * (1 + 1e-7 * rng.standard_normal((40, 1))), full_mantissa((8, d)) * 8])
    return x.astype(np.float32), codebook.astype(np.float32)


@pytest.mark.parametrize("d", [8, 64, 256])
def test_tf32x3_bound_covers_the_truncating_mma_model(d):
    """The kernel's ranking value v = ||e||^2 - 2 x.e, computed as the truncating model does
    (float32 centring and norms, tf32x3 dot with chopped splits and accumulator), is within
    the bound of ``kernels.vq._rounding`` of its exact value, on adversarial inputs."""
    vq_kernels = pytest.importorskip("fastvae.kernels.vq")
    rng = np.random.default_rng(d)
    x, codebook = _adversarial_codes(d, rng)
    centre = codebook.astype(np.float64).mean(0).astype(np.float32)
    x_c, e_c = x - centre, codebook - centre  # float32, as the kernels centre
    e_sq = (e_c * e_c).sum(1, dtype=np.float32)
    v = e_sq[None, :] - np.float32(2) * _truncating_tf32x3_dot(x_c, e_c.T, np.zeros((len(x), len(codebook))))
    x64, e64 = x.astype(np.float64) - centre, codebook.astype(np.float64) - centre
    exact = (e64 * e64).sum(1)[None, :] - 2 * x64 @ e64.T
    max_e = np.sqrt((e64 * e64).sum(1).max())
    scale = max_e**2 + 2 * np.sqrt((x64 * x64).sum(1))[:, None] * max_e
    worst = (np.abs(v - exact) / scale).max() / 2.0**-24
    assert worst <= vq_kernels._rounding(d, True, False) / 2.0**-24, f"error {worst:.1f} u beyond the bound"


def test_gpu_configuration_is_exact_under_the_truncating_mma_model(gpu_vq_configuration, monkeypatch):
    """The CUDA configuration's search, its tf32x3 dots replaced by the truncating model,
    finds the float64 argmin of adversarial near-ties (the bound keeps them for the exact pass)."""
    from triton.runtime import interpreter

    original, modelled = interpreter.InterpreterBuilder.create_dot, []

    def modelled_dot(self, a, b, acc, input_precision, *rest):
        if "TF32x3" not in str(input_precision):
            return original(self, a, b, acc, input_precision, *rest)
        modelled.append(a.data.shape)
        return interpreter.TensorHandle(_truncating_tf32x3_dot(a.data, b.data, acc.data), acc.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", modelled_dot)
    from test_vq import assert_nearest

    for d in (8, 64):
        x, codebook = (torch.from_numpy(t) for t in _adversarial_codes(d, np.random.default_rng(d)))
        with fastvae.use_backend("triton"):
            assert_nearest(*fastvae.nearest_code(x, codebook), x, codebook)
    assert modelled, "no tf32x3 dot ran"


# ---------------------------------------------------------------- shape-aware configurations (item 10)
def test_categorical_kl_tiles_few_classes_with_many_rows(monkeypatch):
    """16 classes gave 16 x 16 tiles (256 elements for a whole block of threads): a few
    classes now take rows enough for 2048 elements a program; results as the reference."""
    requires_on("triton", "cpu", "categorical_kl")
    from triton.runtime.interpreter import InterpretedFunction

    import fastvae.kernels as kernels

    tiles, run = [], InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        tiles.append(kwargs["BLOCK_R"] * kwargs["BLOCK_K"])
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    logits, prior = torch.randn(300, 16), torch.randn(300, 16)
    kl = kernels.categorical_kl(logits, prior, 1, "none")
    assert tiles == [2048]
    assert_close(kl, reference.categorical_kl(logits.double(), prior.double(), 1, "none"), torch.float32)
