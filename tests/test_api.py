"""The public surface as users of torch.nn.functional and VQ libraries call it."""
import inspect

import numpy as np
import torch
import torch.nn.functional as F

import fastvae


def test_gumbel_softmax_signature_is_a_drop_in():
    ours = list(inspect.signature(fastvae.gumbel_softmax).parameters)
    theirs = list(inspect.signature(F.gumbel_softmax).parameters)
    assert ours[:len(theirs)] == theirs
    logits = torch.randn(4, 6)
    y = fastvae.gumbel_softmax(logits, 0.5, True, 1e-10, -1)  # all positional, as F's callers do
    assert torch.equal(y.sum(-1), torch.ones(4))


def test_gumbel_softmax_takes_numpy_and_tensor_temperatures():
    logits = torch.randn(3, 5)
    for tau in (np.float32(0.5), np.float64(2.0), torch.tensor(0.7), 1):
        y = fastvae.gumbel_softmax(logits, tau)
        torch.testing.assert_close(y.sum(-1), torch.ones(3))


def test_vector_quantize_takes_a_float32_codebook_with_half_input():
    """Under autocast the encoder output is bfloat16 while the codebook parameter is float32."""
    x = torch.randn(10, 4).to(torch.bfloat16).requires_grad_()
    codebook = torch.randn(6, 4, requires_grad=True)
    quantized, indices, loss = fastvae.vector_quantize(x, codebook)
    assert quantized.dtype == torch.bfloat16 and loss.dtype == torch.bfloat16
    torch.testing.assert_close(quantized, codebook[indices].to(torch.bfloat16))
    (quantized.float().sum() + loss.float()).backward()
    assert codebook.grad.dtype == torch.float32 and codebook.grad.abs().sum() > 0
    assert x.grad.dtype == torch.bfloat16


def test_functional_ops_are_exported():
    for name in ("reparameterize", "gaussian_kl", "reparameterize_kl", "gumbel_softmax", "categorical_kl",
                 "nearest_code", "vector_quantize", "available_backends", "use_backend", "set_backend"):
        assert callable(getattr(fastvae, name)) and name in fastvae.__all__


def test_layers_compose_in_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), fastvae.nn.GumbelSoftmax(tau=0.5, hard=True))
    y = model(torch.randn(5, 8))
    assert torch.equal(y.sum(-1), torch.ones(5))
    y.sum().backward()
    assert model[0].weight.grad is not None


def test_python_m_fastvae_reports_what_a_bug_report_needs():
    import os
    import subprocess
    import sys

    env = dict(os.environ, FASTVAE_BACKEND="torch", TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "fastvae"], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(fastvae.__file__))).stdout
    assert f"fastvae {fastvae.__version__}" in out and f"torch {torch.__version__}" in out
    assert "selected backend: torch" in out
    # Every backend has a line; the Triton one says why it runs nothing here (no CUDA, interpreter off).
    for name in ("triton", "native", "torch"):
        assert f"  {name}: " in out
    if not torch.cuda.is_available():
        assert "triton: " in out and "TRITON_INTERPRET=1" in out.split("triton: ", 1)[1].splitlines()[0]
    assert "threads: torch " in out and "cpu: " in out and "cuda" in out
