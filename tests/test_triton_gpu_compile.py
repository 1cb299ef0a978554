"""Every Triton launch the ops make on a GPU, compiled for an sm_90 (H100/H200) target.

The interpreter runs kernels as NumPy and forgives what the GPU compiler does not
(non-constexpr globals, dtype mismatches in tl.where, layouts, resource limits). Here the
ops run on CPU tensors with the GPU launch configuration forced (``kernels._launch.gpu_launch``:
64-row tiles, ``tf32x3`` dots, the CUDA rounding bound, 132 SMs) at the benchmarks' GPU
shapes, in float32, bfloat16 and (VQ's 16-bit dot) float16; each launch is recorded *instead of* run (the
shapes are too large for the interpreter, and the tensors are never touched), then the
same kernel, specialised as Triton's JIT would specialise those arguments on a GPU, is
compiled to a cubin for sm_90 in a subprocess (Triton's compiler and ptxas; no GPU
needed), and must fit an H100's block: shared memory <= 227 KiB, no register spills."""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import fastvae
from fastvae import _backend

triton = pytest.importorskip("triton")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif("cpu" not in _backend._BACKENDS["triton"].devices() or torch.cuda.is_available(),
                                 reason="records launches under the interpreter (CPU only)")]
H100_MULTIPROCESSORS = 132
# The benchmarks' GPU shapes, with rows cut wherever the launch configuration (tiles,
# constexprs, integer specialisations) does not depend on them. float32 at every shape;
# the 16-bit paths (loads, conversions, VQ's native 16-bit dot) at the shapes that take
# them, to keep the compile count (ptxas takes seconds a kernel) small.
GAUSSIAN_SHAPE = (65536, 256)
# one tile, online softmax (32768 x 8192), dim=1, few classes (rows-long tiles)
GUMBEL_SHAPES = [(4096, 512), (512, 8192), (64, 16, 7, 7), (65536, 16)]
VQ_SHAPES = [(32768, 1024, 256), (32768, 16384, 8), (32768, 512, 64), (200, 4096, 64)]  # the last splits codes
RESIDUAL_SHAPE = (24000, 128, 8, 1024, 128)  # (N, D) and (R, K, D)
SIXTEEN_BIT_SHAPES = {"gumbel": GUMBEL_SHAPES[:1], "vq": [(32768, 1024, 256), (32768, 512, 64)]}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _describe(param, value):
    """What the compiled kernel depends on: a pointer's dtype and alignment, a constexpr's
    value, a runtime integer's specialisation (Triton's: 1 is a constant, a multiple of 16
    is marked divisible), a float's type. Launches alike in these compile alike."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", ""), "aligned": value.data_ptr() % 16 == 0}
    if param is None or param.is_constexpr or value is None or isinstance(value, str):
        return {"value": value}
    kind, key = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize, True)
    return {"value": value if kind == "constexpr" else None, "kind": kind, "key": key}


def _backward(out):
    """Back-propagate zero-cost: gradients are uninitialised tensors, never read on CPU."""
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.is_floating_point() and o.requires_grad]
    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])


def _leaf(*shape, dtype):
    return torch.empty(shape, dtype=dtype).requires_grad_()


def _gpu_shaped_calls(dtype):
    """Forward calls of every op at GPU shapes (float16: VQ's 16-bit dot only)."""
    wide = dtype == torch.float32
    if dtype != torch.float16:
        mu, logvar = _leaf(*GAUSSIAN_SHAPE, dtype=dtype), _leaf(*GAUSSIAN_SHAPE, dtype=dtype)
        prior = _leaf(GAUSSIAN_SHAPE[-1], dtype=dtype)
        yield lambda: fastvae.reparameterize(mu, logvar)
        yield lambda: fastvae.gaussian_kl(mu, logvar)
        yield lambda: fastvae.gaussian_kl(mu, logvar, prior, None, reduction="none")
        yield lambda: fastvae.reparameterize_kl(mu, logvar)
        for shape in GUMBEL_SHAPES if wide else SIXTEEN_BIT_SHAPES["gumbel"]:
            logits = _leaf(*shape, dtype=dtype)
            dim = 1 if len(shape) == 4 else -1
            yield lambda: fastvae.gumbel_softmax(logits, 0.5, dim=dim)
            yield lambda: fastvae.gumbel_softmax(logits, 0.5, hard=True, dim=dim)
            yield lambda: fastvae.categorical_kl(logits, logits.detach(), dim=dim)
        # GumbelQuantizer at DALL-E's scale: (B=8, 32x32) positions, K=8192 codes of D=256
        logits, codebook = _leaf(8192, 8192, dtype=dtype), _leaf(8192, 256, dtype=dtype)
        tau = torch.full((), 0.5, requires_grad=True)
        yield lambda: fastvae.gumbel_quantize(logits, codebook, tau, dim=-1)[0]
        yield lambda: fastvae.gumbel_quantize(logits, codebook, tau, hard=True, dim=-1)[0]
    for n, k, d in VQ_SHAPES if wide else SIXTEEN_BIT_SHAPES["vq"]:
        x, codebook = _leaf(n, d, dtype=dtype), _leaf(k, d, dtype=dtype)
        yield lambda: fastvae.nearest_code(x, codebook)
        if dtype != torch.float16:
            yield lambda: fastvae.vector_quantize(x, codebook)
    if dtype != torch.float16:  # residual VQ's backward kernels at EnCodec's shape, called with real
        # indices (the recorded forward leaves its own unset, and the sorted sums read them)
        from fastvae.kernels import residual_vq
        x, codebooks = torch.empty(*RESIDUAL_SHAPE[:2], dtype=dtype), torch.empty(*RESIDUAL_SHAPE[2:], dtype=dtype)
        indices = torch.zeros(RESIDUAL_SHAPE[0], RESIDUAL_SHAPE[2], dtype=torch.int64)
        grad_losses = torch.ones(RESIDUAL_SHAPE[2], dtype=dtype)
        yield lambda: residual_vq.residual_quantize_backward(x, grad_losses, x, codebooks, indices, 0.25)
        yield lambda: residual_vq.residual_segment_sums(x, codebooks, indices)


@functools.lru_cache(maxsize=None)
def _jit_function(fn):
    """The JITFunction of an interpreted kernel's Python function (for its parameters)."""
    return triton.runtime.JITFunction(fn)


def _record_gpu_launches(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    import fastvae.kernels._launch as vq_launch

    launches = set()

    def record(self, *args, grid, warmup, **kwargs):
        params = {p.name: p for p in _jit_function(self.fn).params}
        names = list(params)
        launches.add(json.dumps({"module": self.fn.__module__, "name": self.fn.__name__,
                                 "args": [_describe(params[names[i]], a) for i, a in enumerate(args)],
                                 "kwargs": {k: _describe(params.get(k), v) for k, v in kwargs.items()}},
                                sort_keys=True))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    monkeypatch.setattr(vq_launch, "gpu_launch", lambda x: True)
    monkeypatch.setattr(vq_launch, "multiprocessors", lambda device: H100_MULTIPROCESSORS)
    implemented = set(_backend.implementations("triton"))
    with fastvae.use_backend("triton"):
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            try:
                for dtype in DTYPES:
                    for call in _gpu_shaped_calls(dtype):
                        _backward(call())
            finally:
                torch.use_deterministic_algorithms(False)
    assert implemented, "the triton backend implements no op"
    return [json.loads(launch) for launch in sorted(launches)]


def test_every_gpu_launch_compiles_for_sm90_within_an_h100_block(tmp_path, monkeypatch):
    launches = _record_gpu_launches(monkeypatch)
    names = {launch["name"] for launch in launches}
    assert {"_codebook_kernel", "_search_kernel", "_resolve_kernel", "_gather_kernel", "_grad_x_kernel",
            "_grad_codebook_atomic_kernel",
            "_grad_codebook_sorted_kernel", "_forward_kernel", "_backward_kernel", "_gumbel_kernel",
            "_kl_kernel", "_logits_grad_kernel", "_codebook_grad_kernel", "_residual_backward_kernel",
            "_stage_sums_kernel"} <= names
    search_constants = {(l["kwargs"]["D"]["value"], l["kwargs"]["BLOCK_D"]["value"], l["kwargs"]["PRECISION"]["value"])
                        for l in launches if l["name"] == "_search_kernel"}
    assert {(8, 16), (64, 64), (256, 64)} <= {c[:2] for c in search_constants}  # D > BLOCK_D compiled too
    # Each branch of the shape-aware VQ search configuration (kernels.vq._config, _search_options).
    search_tiles = {tuple(l["kwargs"][name]["value"] for name in ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages",
                                                                  "DOT_16BIT"))
                    for l in launches if l["name"] == "_search_kernel"}
    assert {(128, 64, 8, 3, False), (64, 64, 4, 3, False), (64, 128, 8, 3, True), (64, 64, 4, 2, False),
            (64, 64, 4, 2, True)} <= search_tiles, search_tiles
    records = tmp_path / "launches.json"
    records.write_text(json.dumps(launches))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    compiler = os.path.join(os.path.dirname(__file__), "triton_sm90_compile.py")
    result = subprocess.run([sys.executable, compiler, str(records)], env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    assert f"compiled {len(launches)} launches" in result.stdout
