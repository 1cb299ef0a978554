"""VQ column: nearest_code, vector_quantize (forward, backward) and nn.VectorQuantizer.

Every backend is checked against a float64 brute force over all (row, code) pairs. An
index may differ from the brute force's only at a genuine near-tie: the two codes'
float64 distances within float32 rounding of each other (``_NEAR_TIE``).
"""
import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastvae
import fastvae.nn
from helpers import DTYPES, TOLERANCES, non_contiguous, requires

# An exact float32 (x - e)^2 errs by at most about (D + 2) u d: two codes whose float64
# distances are that close may legitimately swap ranks (doubled, for either side).
_NEAR_TIE = 4 * 2.0**-24

# (N, K, D): every D in {1, 3, 8, 64, 256}, K in {1, 7, 512, 1000}, N in {1, 5, 1000};
# (1, 1000, 8) and (5, 1000, 256) make the Triton backend split the codes across programs.
SHAPES = [(1000, 512, 8), (1000, 1000, 64), (5, 1000, 256), (1, 7, 3), (1000, 1, 1), (5, 512, 1), (1000, 7, 256),
          (1, 1000, 8), (5, 7, 64), (1000, 512, 3)]


def brute_force(x, codebook):
    """float64 (N, K) distances: the oracle, test sizes only."""
    x64, cb64 = x.detach().reshape(-1, codebook.shape[1]).double(), codebook.detach().double()
    return ((x64[:, None, :] - cb64[None]) ** 2).sum(dim=2)


def assert_nearest(indices, sq_dist, x, codebook):
    """Indices are the float64 argmin up to near-ties; sq_dist is their distance."""
    dist = brute_force(x, codebook)
    indices, sq_dist = indices.reshape(-1), sq_dist.reshape(-1)
    assert indices.dtype == torch.int64 and sq_dist.dtype == x.dtype
    assert indices.min() >= 0 and indices.max() < codebook.shape[0]
    truth = dist.argmin(dim=1)
    chosen = dist.gather(1, indices[:, None]).squeeze(1)
    best = dist.gather(1, truth[:, None]).squeeze(1)
    excess = chosen - best
    allowed = _NEAR_TIE * (codebook.shape[1] + 2) * best + 1e-30
    wrong = (excess > allowed).nonzero().squeeze(1)
    assert wrong.numel() == 0, (f"{wrong.numel()} rows not nearest, first {wrong[:5].tolist()}: "
                                f"chose {indices[wrong[:5]].tolist()} (excess {excess[wrong[:5]].tolist()}), "
                                f"truth {truth[wrong[:5]].tolist()}")
    atol, rtol = TOLERANCES[x.dtype]
    torch.testing.assert_close(sq_dist.double(), chosen, atol=atol, rtol=rtol * (1 + codebook.shape[1] ** 0.5))


@contextlib.contextmanager
def deterministic_algorithms(enabled):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def clustered(n, k, d, dtype=torch.float32, spread=1e-3):
    """Codes in tight groups of four (plus exact duplicates), rows near the groups' centres:
    near-ties everywhere."""
    centres = torch.randn((k + 3) // 4, d)
    codebook = centres[torch.arange(k) // 4] + spread * torch.randn(k, d)
    codebook[1::8] = codebook[0::8][: codebook[1::8].shape[0]]  # exact duplicates: ties to the lowest index
    x = centres[torch.randint(centres.shape[0], (n,))] + spread * torch.randn(n, d)
    return x.to(dtype), codebook.to(dtype)


@pytest.mark.parametrize("n,k,d", SHAPES)
def test_nearest_code_random(backend, n, k, d):
    requires(backend, "nearest_code")
    x, codebook = torch.randn(n, d), torch.randn(k, d)
    assert_nearest(*fastvae.nearest_code(x, codebook), x, codebook)


@pytest.mark.parametrize("n,k,d", [(1000, 512, 8), (200, 1000, 64), (5, 7, 3), (301, 700, 12), (97, 300, 33)])
def test_nearest_code_clustered(backend, n, k, d):
    requires(backend, "nearest_code")
    x, codebook = clustered(n, k, d)
    indices, sq_dist = fastvae.nearest_code(x, codebook)
    assert_nearest(indices, sq_dist, x, codebook)
    # Exact duplicates have bit-identical distances in any arithmetic: the lower index wins.
    duplicate_of = {i: i - 1 for i in range(1, k, 8)}
    assert not any(int(i) in duplicate_of for i in indices), "a duplicate code beat its lower-index twin"


@pytest.mark.parametrize("n,k,d", [(1000, 512, 8), (300, 1000, 64), (50, 7, 256), (301, 700, 12), (97, 300, 33)])
def test_nearest_code_large_norms(backend, n, k, d):
    """||x|| ~ 1e3 with unit-scale gaps: ||e||^2 - 2 x.e in float32 loses the digits that rank."""
    requires(backend, "nearest_code")
    offset = 1e3 * torch.randn(d) / d**0.5
    codebook, x = offset + torch.randn(k, d), offset + torch.randn(n, d)
    assert_nearest(*fastvae.nearest_code(x, codebook), x, codebook)
    # The data is hard: the plain float32 expansion gets rows wrong beyond near-ties.
    naive = torch.addmm((codebook * codebook).sum(1), x, codebook.t(), alpha=-2.0).argmin(1)
    dist = brute_force(x, codebook)
    excess = dist.gather(1, naive[:, None]).squeeze(1) - dist.min(dim=1).values
    assert (excess > _NEAR_TIE * (d + 2) * dist.min(dim=1).values).any() or k == 7


@pytest.mark.parametrize("d", [2, 8, 12, 64])
def test_nearest_code_duplicates_far_apart(backend, d):
    """A code repeated at far-apart indices (different tiles of codes): the first copy wins,
    for rows on it and rows near it."""
    requires(backend, "nearest_code")
    k = 1000
    codebook = torch.randn(k, d)
    for copy in (37, 500, 999):
        codebook[copy] = codebook[21]
    x = codebook[21] + 1e-4 * torch.randn(203, d)
    x[::2] = codebook[21]
    indices, sq_dist = fastvae.nearest_code(x, codebook)
    assert_nearest(indices, sq_dist, x, codebook)
    assert (indices == 21).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_code_dtypes_and_layout(backend, dtype):
    requires(backend, "nearest_code")
    x = non_contiguous(torch.randn(2, 3, 50, 64).to(dtype))  # (B, H, W, D), strided
    codebook = torch.randn(300, 64).to(dtype)
    indices, sq_dist = fastvae.nearest_code(x, codebook)
    assert indices.shape == (2, 3, 50) and sq_dist.shape == (2, 3, 50) and sq_dist.is_contiguous()
    assert_nearest(indices, sq_dist, x, codebook)


def test_nearest_code_exact_ties(backend):
    """Rows exactly between two codes: equal distances in any arithmetic, lowest index wins."""
    requires(backend, "nearest_code")
    codebook = torch.tensor([[3.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    x = torch.tensor([[0.0, 0.0], [0.0, 5.0], [1.0, 0.0], [2.0, 0.0]])
    indices, sq_dist = fastvae.nearest_code(x, codebook)
    assert indices.tolist() == [1, 1, 1, 0]
    assert sq_dist.tolist() == [1.0, 26.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d", [(1000, 512, 8), (5, 1000, 256), (40, 7, 3)])
def test_vector_quantize_forward(backend, dtype, n, k, d):
    requires(backend, "vector_quantize")
    x, codebook = torch.randn(n, d).to(dtype), torch.randn(k, d).to(dtype)
    quantized, indices, loss = fastvae.vector_quantize(x, codebook, beta=0.3)
    assert quantized.dtype == dtype and loss.dtype == dtype and loss.shape == ()
    assert torch.equal(quantized, codebook[indices])  # a gather, bit for bit
    dist = brute_force(x, codebook)
    assert_nearest(indices, dist.gather(1, indices[:, None]).squeeze(1).to(dtype), x, codebook)
    expected = 1.3 * dist.gather(1, indices[:, None]).sum() / (n * d)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), expected, atol=atol, rtol=rtol)


def textbook_vq(x, codebook, indices, beta):
    """VQ-VAE as usually written: straight-through estimator, codebook + commitment loss."""
    e = codebook[indices]
    quantized = x + (e - x).detach()
    loss = torch.nn.functional.mse_loss(e, x.detach()) + beta * torch.nn.functional.mse_loss(x, e.detach())
    return quantized, loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((1000, 8), 512), ((2, 5, 7, 64), 100), ((3, 256), 7)])
def test_vector_quantize_gradients(backend, dtype, shape, k):
    requires(backend, "vector_quantize", "vector_quantize_backward")
    x = torch.randn(shape).to(dtype).requires_grad_()
    codebook = torch.randn(k, shape[-1]).to(dtype).requires_grad_()
    quantized, indices, loss = fastvae.vector_quantize(x, codebook, beta=0.25)
    grad_q, grad_loss = torch.randn(shape).to(dtype), torch.tensor(1.7, dtype=dtype)
    torch.autograd.backward([quantized, loss], [grad_q, grad_loss])

    x64 = x.detach().double().requires_grad_()
    cb64 = codebook.detach().double().requires_grad_()
    q64, loss64 = textbook_vq(x64, cb64, indices, 0.25)
    torch.autograd.backward([q64, loss64], [grad_q.double(), grad_loss.double()])
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=atol, rtol=rtol)
    scale = cb64.grad.abs().max().item()  # segment sums: tolerance relative to the largest entry
    torch.testing.assert_close(codebook.grad.double(), cb64.grad, atol=atol * max(scale, 1e-3), rtol=rtol)


def test_vector_quantize_non_contiguous_gradients(backend):
    requires(backend, "vector_quantize", "vector_quantize_backward")
    base = torch.randn(4, 6, 32)
    x = non_contiguous(base).requires_grad_()
    codebook = torch.randn(40, 32, requires_grad=True)
    quantized, indices, loss = fastvae.vector_quantize(x, codebook)
    (quantized.sum() + loss).backward()
    x64, cb64 = base.double().requires_grad_(), codebook.detach().double().requires_grad_()
    q64, loss64 = textbook_vq(x64, cb64, indices, 0.25)
    (q64.sum() + loss64).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(codebook.grad.double(), cb64.grad, atol=2e-5, rtol=2e-5)


def test_deterministic_backward_bits(backend):
    requires(backend, "vector_quantize_backward")
    x, codebook = clustered(3000, 64, 16, spread=0.3)  # many rows per code: order matters
    x.requires_grad_()
    codebook.requires_grad_()
    grads = []
    with deterministic_algorithms(True):
        for _ in range(2):
            quantized, _, loss = fastvae.vector_quantize(x, codebook)
            grads.append(torch.autograd.grad(quantized.sum() + 3 * loss, (x, codebook)))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("n,k,d", [(40, 300, 64), (3, 1000, 40), (20, 50, 256)])
def test_triton_small_blocks(monkeypatch, n, k, d):
    """The Triton kernels with GPU-sized blocks (the D > BLOCK_D loop, many code splits)."""
    if "triton" not in fastvae.available_backends():
        pytest.skip("the triton backend is not available")
    import importlib
    kernels_vq = importlib.import_module("fastvae.kernels.vq")
    monkeypatch.setattr(kernels_vq, "_config", lambda x: (16, 16, 16, 16, 64))
    offset = 300.0 * torch.ones(d)  # large norms: the exact rescan runs with these blocks too
    for x, codebook in [(torch.randn(n, d), torch.randn(k, d)), (offset + torch.randn(n, d), offset + torch.randn(k, d))]:
        assert_nearest(*kernels_vq.nearest_code(x, codebook), x, codebook)


def test_bad_input_raises(backend):
    x, codebook = torch.randn(10, 4), torch.randn(5, 4)
    with pytest.raises(TypeError, match="x"):
        fastvae.nearest_code(x.long(), codebook)
    with pytest.raises(ValueError, match="dim"):
        fastvae.nearest_code(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="codebook"):
        fastvae.nearest_code(x, torch.randn(4))
    with pytest.raises(ValueError, match="codebook"):
        fastvae.nearest_code(x, torch.randn(0, 4))
    with pytest.raises(TypeError, match="codebook"):
        fastvae.vector_quantize(x, codebook.long())  # another float dtype is cast to x's (autocast)
    with pytest.raises(TypeError, match="beta"):
        fastvae.vector_quantize(x, codebook, beta="0.25")


def test_native_backwards_check_indices_before_reading_codes():
    # The kernels called directly (fastvae.ops never passes such indices): an index outside
    # the codebook, or fewer indices than rows, raises instead of reading out of bounds.
    native = pytest.importorskip("fastvae._native")
    x, codebook, grad = torch.randn(6, 3), torch.randn(4, 3), torch.randn(6, 3)
    for backward in (native.vector_quantize_backward, native.vector_quantize_rotation_backward):
        with pytest.raises(RuntimeError, match="out of range"):
            backward(grad, torch.tensor(1.0), x, codebook, torch.tensor([0, 1, 2, 3, 2**40, 0]), 0.25)
        with pytest.raises(RuntimeError, match=r"indices \(N,\)"):
            backward(grad, torch.tensor(1.0), x, codebook, torch.zeros(5, dtype=torch.long), 0.25)


_PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, fastvae
    n, k, d = 200000, 16384, 8
    torch.manual_seed(0)
    x, codebook = torch.randn(n, d), torch.randn(k, d)
    fastvae.nearest_code(x[:10], codebook)  # loads the extension, warms the allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with fastvae.use_backend("native"):
        indices, sq_dist = fastvae.nearest_code(x, codebook)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    probe = torch.randperm(n)[:64]
    truth = ((x[probe, None, :].double() - codebook[None].double()) ** 2).sum(2).min(1).values
    json.dump({"peak_growth": after - before, "probe_excess": (sq_dist[probe].double() - truth).abs().max().item()},
              sys.stdout)
""")


def test_never_materialises_distance_matrix():
    """N = 200000, K = 16384, D = 8 on the native backend: the (N, K) float32 matrix would
    take 13 GB; the search's peak memory growth (peak RSS, in a fresh process) must stay
    within its buffers."""
    if "native" not in fastvae.available_backends():
        pytest.skip("the native backend is not built")
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["peak_growth"] < 256 * 2**20, report  # outputs are 2.4 MB; buffers a few MB per thread
    assert report["probe_excess"] < 1e-3, report  # and it did search: its distances are the minima


# ---------------------------------------------------------------- nn.VectorQuantizer
def test_module_channel_first_matches_functional(backend):
    requires(backend, "vector_quantize")
    layer = fastvae.nn.VectorQuantizer(50, 16, beta=0.5, channel_dim=1)
    with torch.no_grad():
        layer.codebook.normal_()
    x = torch.randn(2, 16, 5, 6)
    quantized, indices, loss = layer(x)
    ref_q, ref_i, ref_loss = fastvae.vector_quantize(x.movedim(1, -1), layer.codebook, beta=0.5)
    assert quantized.shape == x.shape and indices.shape == (2, 5, 6)
    assert torch.equal(indices, ref_i) and torch.equal(quantized, ref_q.movedim(-1, 1))
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    assert layer.codebook.grad is not None and layer.codebook.grad.abs().sum() > 0


def test_module_ema_moves_codes_to_their_data(backend):
    requires(backend, "vector_quantize", "vector_quantize_backward")
    layer = fastvae.nn.VectorQuantizer(4, 2, beta=0.25, ema_decay=0.8)
    assert "codebook" not in dict(layer.named_parameters()) and "codebook" in dict(layer.named_buffers())
    with torch.no_grad():
        layer.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [50.0, 50.0]]))
        layer.ema_sum.copy_(layer.codebook)
    targets = torch.tensor([[1.0, 1.0], [9.0, 12.0], [-11.0, 9.0]])  # code 3 is never chosen
    for _ in range(25):
        x = (targets.repeat(100, 1) + 0.1 * torch.randn(300, 2)).requires_grad_()
        quantized, indices, loss = layer(x)
        (quantized.sum() + loss).backward()  # works although the buffer changed after forward
        torch.testing.assert_close(loss.detach(), 0.25 * ((x - quantized) ** 2).mean().detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.codebook[:3], targets, atol=0.05, rtol=0)
    # The unused code stays put while its count (0.8^25) is well above the smoothing eps.
    torch.testing.assert_close(layer.codebook[3], torch.tensor([50.0, 50.0]), atol=0.5, rtol=0)
    layer.eval()
    before = layer.codebook.clone()
    layer(torch.randn(10, 2))
    assert torch.equal(layer.codebook, before), "eval mode must not update the codebook"


def test_module_usage_statistics(backend):
    requires(backend, "vector_quantize")
    layer = fastvae.nn.VectorQuantizer(8, 3)
    with torch.no_grad():
        layer.codebook.copy_(torch.eye(8, 3) * 10)
    x = torch.cat([layer.codebook[:2].repeat(30, 1), layer.codebook[5:6].repeat(60, 1)])
    _, indices, _ = layer(x)
    assert torch.equal(layer.usage_count, torch.bincount(indices, minlength=8))
    # Frequencies 1/4, 1/4, 1/2: entropy 1.5 bits.
    torch.testing.assert_close(layer.perplexity, torch.tensor(2.0**1.5))
    layer(x)
    assert layer.usage_count.sum().item() == 2 * x.shape[0]
    layer.eval()
    layer(x)
    assert layer.usage_count.sum().item() == 2 * x.shape[0]
    layer.reset_usage()
    assert layer.usage_count.sum().item() == 0
    assert "ema_decay" not in repr(layer) and "num_codes=8" in repr(layer)
    assert "ema_decay=0.99" in repr(fastvae.nn.VectorQuantizer(8, 3, ema_decay=0.99))


# ---------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,d", [(65536, 8192, 256), (65536, 16384, 8), (131072, 512, 64), (3, 16384, 256)])
def test_cuda_nearest_code(n, k, d):
    x, codebook = torch.randn(n, d, device="cuda"), torch.randn(k, d, device="cuda")
    indices, sq_dist = fastvae.nearest_code(x, codebook)
    probe = torch.randperm(n, device="cuda")[:512]
    assert_nearest(indices[probe].cpu(), sq_dist[probe].cpu(), x[probe].cpu(), codebook.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_clustered_large_norm_and_gradients(dtype):
    x, codebook = clustered(4000, 1000, 64, dtype=dtype)
    x, codebook = (x.float() + 300).to(dtype).cuda(), (codebook.float() + 300).to(dtype).cuda()
    assert_nearest(*(t.cpu() for t in fastvae.nearest_code(x, codebook)), x.cpu(), codebook.cpu())
    for deterministic in (False, True):
        with deterministic_algorithms(deterministic):
            xg, cbg = x.clone().requires_grad_(), codebook.clone().requires_grad_()
            quantized, indices, loss = fastvae.vector_quantize(xg, cbg)
            (quantized.float().sum() + loss).backward()
            x64, cb64 = xg.detach().double().requires_grad_(), cbg.detach().double().requires_grad_()
            q64, loss64 = textbook_vq(x64, cb64, indices, 0.25)
            (q64.sum() + loss64).backward()
            atol, rtol = TOLERANCES[dtype]
            torch.testing.assert_close(xg.grad.double(), x64.grad, atol=atol, rtol=rtol)
            torch.testing.assert_close(cbg.grad.double(), cb64.grad, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- exactness without a rescan cliff
@pytest.fixture
def vq_gpu_exact_work(monkeypatch):
    """The Triton VQ launchers in their CUDA configuration (``_gpu_launch``, 132 SMs) under
    the interpreter, recording per kernel its grid and the exact-distance helpers it calls:
    ``_row_sq_dist`` (a candidate per row) and ``_exact_sq_dist`` (a rescan tile of codes)."""
    if "cpu" not in fastvae._backend._BACKENDS["triton"].devices():
        pytest.skip("needs the Triton interpreter")
    from test_gpu_readiness import _interpret_bfloat16_dots
    from triton.runtime.interpreter import InterpretedFunction

    import fastvae.kernels._launch as vq_launch
    import fastvae.kernels.vq as vq_kernels

    monkeypatch.setattr(vq_launch, "gpu_launch", lambda x: True)
    monkeypatch.setattr(vq_launch, "multiprocessors", lambda device: 132)
    _interpret_bfloat16_dots(monkeypatch)
    work = {"grids": {}, "calls": {}}
    run, call = InterpretedFunction.run, InterpretedFunction.__call__

    def recording_run(self, *args, grid, **kwargs):
        work["grids"][self.fn.__name__] = tuple(grid) + (1,) * (3 - len(grid))
        return run(self, *args, grid=grid, **kwargs)

    def recording_call(self, *args, **kwargs):
        work["calls"][self.fn.__name__] = work["calls"].get(self.fn.__name__, 0) + 1
        return call(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    monkeypatch.setattr(InterpretedFunction, "__call__", recording_call)
    return vq_kernels, work


def test_triton_near_tie_pairs_are_rescored_without_a_rescan(vq_gpu_exact_work):
    """Rows midway between two codes (far from the rest) are ambiguous to the tf32x3
    search: only those rows, and only their two candidates, get exact distances."""
    vq_kernels, work = vq_gpu_exact_work
    codebook = 4.0 * torch.randn(200, 16)
    halfway = (codebook[0:60:2] + codebook[1:60:2]) / 2
    x = torch.cat([halfway, codebook[100:130] + 0.05 * torch.randn(30, 16)])
    assert_nearest(*vq_kernels.nearest_code(x, codebook), x, codebook)
    assert work["calls"].get("_row_sq_dist", 0) > 0
    assert work["calls"].get("_exact_sq_dist", 0) == 0, "a near-tie pair rescanned every code"


def test_triton_centring_removes_the_large_norm_rescan(vq_gpu_exact_work):
    """A common offset of 300 makes ||e||^2 ~ 6e6 and the expansion's bound ~ 200, above the
    gaps of unit-scale data; centred on the codebook's mean the bound is ~ 2e-3, below them."""
    vq_kernels, work = vq_gpu_exact_work
    offset = 300.0 * torch.ones(64)
    codebook, x = offset + torch.randn(300, 64), offset + torch.randn(40, 64)
    assert_nearest(*vq_kernels.nearest_code(x, codebook), x, codebook)
    assert not {"_row_sq_dist", "_exact_sq_dist"} & set(work["calls"]), "large norms still made rows ambiguous"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_duplicate_rescan_is_split_across_codes(vq_gpu_exact_work, dtype):
    """Three copies of a code (three codes within the bound: no short candidate list) for
    a few rows against many codes: the exact rescan is spread over programs on the code
    axis, each scanning its share, and the answers are the float64 oracle's (lowest copy)."""
    vq_kernels, work = vq_gpu_exact_work
    k, d = 2000, 8
    codebook = torch.randn(k, d)
    for copy in (900, 1500):
        codebook[copy] = codebook[300]
    x = torch.cat([codebook[300:301] + 1e-4 * torch.randn(5, d), torch.randn(5, d)])
    x, codebook = x.to(dtype), codebook.to(dtype)
    indices, sq_dist = vq_kernels.nearest_code(x, codebook)
    assert_nearest(indices, sq_dist, x, codebook)
    assert (indices[:5] == 300).all()
    row_blocks, scans, _ = work["grids"]["_resolve_kernel"]
    assert row_blocks == 1 and scans > 1
    scanned_tiles = work["calls"]["_exact_sq_dist"]
    assert scanned_tiles <= (k + 7) // 8 + scans  # each tile of 8 codes once (plus a partial tile per scan)


@pytest.mark.parametrize("n,k,d", [(3, 3000, 64), (130, 70, 8), (40, 300, 256)])
def test_triton_gpu_configuration_hard_cases_match_the_oracle(vq_gpu_exact_work, n, k, d):
    """Duplicates, near-ties and large norms at once (small N against large K too), in the
    CUDA configuration, forward and loss, against the float64 oracle."""
    vq_kernels, _ = vq_gpu_exact_work
    x, codebook = clustered(n, k, d)
    x, codebook = x + 50.0, codebook + 50.0
    assert_nearest(*vq_kernels.nearest_code(x, codebook), x, codebook)
    quantized, indices, loss = vq_kernels.vector_quantize(x, codebook, 0.25)
    assert_nearest(indices, ((quantized.double() - x.double()) ** 2).sum(1).float(), x, codebook)
    expected = 1.25 * ((quantized.double() - x.double()) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
