"""Every Triton kernel launch the ops make, compiled for an sm_90 (H100/H200) target.

The interpreter runs kernels as NumPy and forgives what the GPU compiler does not
(non-constexpr globals, dtype mismatches in tl.where, layouts). Here each launch is
recorded while the ops run under the interpreter, then the same kernel with the same
argument types and constexprs is compiled to PTX and cubin for sm_90 in a subprocess
(Triton's own compiler and ptxas; no GPU needed)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastvae
from fastvae import _backend

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.skipif("cpu" not in _backend._BACKENDS["triton"].devices() or torch.cuda.is_available(),
                                reason="records launches under the interpreter (CPU only)")


def _describe(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", "")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    return {"value": repr(value)}


def _exercise_every_op():
    """Forward and backward of every op the triton backend implements, in two dtypes."""
    for dtype in (torch.float32, torch.bfloat16):
        mu = torch.randn(5, 37, dtype=dtype, requires_grad=True)
        logvar = torch.randn(5, 37, dtype=dtype, requires_grad=True)
        prior = torch.randn(37, dtype=dtype, requires_grad=True)
        logits = torch.randn(6, 33, dtype=dtype, requires_grad=True)
        wide_logits = torch.randn(2, 9000, dtype=dtype, requires_grad=True)  # rows wider than one tile
        x = torch.randn(40, 8, dtype=dtype, requires_grad=True)
        codebook = torch.randn(70, 8, dtype=dtype, requires_grad=True)
        calls = {
            "reparameterize": lambda: fastvae.reparameterize(mu, logvar),
            "gaussian_kl": lambda: fastvae.gaussian_kl(mu, logvar, prior, prior),
            "reparameterize_kl": lambda: fastvae.reparameterize_kl(mu, logvar, reduction="none"),
            "gumbel_softmax": lambda: (fastvae.gumbel_softmax(logits, 0.5, hard=True), fastvae.gumbel_softmax(logits, 0.5),
                                       fastvae.gumbel_softmax(wide_logits, 0.5)),
            "categorical_kl": lambda: fastvae.categorical_kl(logits, logits.detach() * 2),
            "nearest_code": lambda: fastvae.nearest_code(x, codebook),
            "vector_quantize": lambda: fastvae.vector_quantize(x, codebook),
        }
        implemented = set(_backend.implementations("triton"))
        with fastvae.use_backend("triton"):
            for op, call in calls.items():
                if op not in implemented:
                    continue
                out = call()
                outs = out if isinstance(out, tuple) else (out,)
                loss = sum(o.float().sum() for o in outs if o.is_floating_point())
                if op + "_backward" in implemented and loss.requires_grad:
                    loss.backward()


def test_every_recorded_launch_compiles_for_sm90(tmp_path, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    original_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launches.append({"module": self.fn.__module__, "name": self.fn.__name__,
                         "args": [_describe(a) for a in args],
                         "kwargs": {k: _describe(v) for k, v in kwargs.items()}})
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    _exercise_every_op()
    torch.use_deterministic_algorithms(True)
    try:
        _exercise_every_op()
    finally:
        torch.use_deterministic_algorithms(False)
    if not launches:
        pytest.skip("the triton backend implements no op yet")
    unique = {json.dumps(launch, sort_keys=True) for launch in launches}
    records = tmp_path / "launches.json"
    records.write_text(json.dumps([json.loads(u) for u in sorted(unique)]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    compiler = os.path.join(os.path.dirname(__file__), "triton_sm90_compile.py")
    result = subprocess.run([sys.executable, compiler, str(records)], env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"compiled {len(unique)} launches" in result.stdout
