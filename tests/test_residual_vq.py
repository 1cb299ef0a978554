"""Residual VQ's backward paths and statistics: deterministic codebook gradients, the
backward without codebook gradients (EMA layers), residual_segment_sums, and the EMA layer
against R sequential EMA quantizers. Every backend against float64 truths."""
import pytest
import torch

import fastvae
from fastvae.nn import ResidualVectorQuantizer, VectorQuantizer
from fastvae.ops.residual_vq import residual_segment_sums
from helpers import TOLERANCES, requires
from test_vq_tokenizer import sequential_residual64


def _inputs(n, d, r, k, dtype=torch.float32):
    x = torch.randn(n, d).to(dtype)
    codebooks = (torch.randn(r, k, d) * torch.logspace(0, -1, r)[:, None, None]).to(dtype)
    return x, codebooks


def _backward(x, codebooks, grad_q, grad_losses, codebook_grad=True):
    xg, cbg = x.clone().requires_grad_(), codebooks.clone().requires_grad_(codebook_grad)
    quantized, indices, losses = fastvae.residual_quantize(xg, cbg, beta=0.3)
    torch.autograd.backward([quantized, losses], [grad_q, grad_losses])
    return indices, xg.grad, cbg.grad


@pytest.mark.parametrize("n,d,r,k", [(70, 6, 3, 8), (33, 20, 4, 5)])
def test_residual_backward_deterministic_matches_float64_and_repeats(backend, n, d, r, k):
    """Under use_deterministic_algorithms the codebooks' gradient is a fixed-order sum
    (Triton: sorted segments, not atomics): the float64 sequential truth, the same bits twice."""
    requires(backend, "residual_quantize", "residual_quantize_backward")
    x, codebooks = _inputs(n, d, r, k)
    grad_q, grad_losses = torch.randn(n, d), torch.rand(r) + 0.5
    torch.use_deterministic_algorithms(True)
    try:
        indices, gx, gcb = _backward(x, codebooks, grad_q, grad_losses)
        _, gx2, gcb2 = _backward(x, codebooks, grad_q, grad_losses)
    finally:
        torch.use_deterministic_algorithms(False)
    _, _, gx64, gcb64 = sequential_residual64(x, codebooks, indices, 0.3, grad_q, grad_losses)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(gx.double(), gx64, atol=atol * r, rtol=rtol)
    torch.testing.assert_close(gcb.double(), gcb64, atol=atol * max(gcb64.abs().max().item(), 1e-3), rtol=rtol)
    assert torch.equal(gx, gx2) and torch.equal(gcb, gcb2)


def test_residual_backward_without_codebook_gradient(backend):
    """Codebooks that take no gradient (an EMA layer's buffers): x's gradient is unchanged."""
    requires(backend, "residual_quantize", "residual_quantize_backward")
    x, codebooks = _inputs(50, 7, 3, 6)
    grad_q, grad_losses = torch.randn(50, 7), torch.rand(3) + 0.5
    indices, gx, gcb = _backward(x, codebooks, grad_q, grad_losses, codebook_grad=False)
    assert gcb is None
    _, _, gx64, _ = sequential_residual64(x, codebooks, indices, 0.3, grad_q, grad_losses)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(gx.double(), gx64, atol=atol * 3, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,r,k", [(90, 5, 3, 7), (40, 33, 2, 4), (13000, 8, 3, 16)])
def test_residual_segment_sums(backend, dtype, n, d, r, k):
    """Per stage and code: the sum and count of the stage inputs (native: 13000 rows are
    three of its row parts, summed in part order)."""
    requires(backend, "residual_quantize", "residual_segment_sums")
    if n > 1000 and backend != "native":
        pytest.skip("the row parts are the native kernel's; the interpreter is slow at this size")
    x, codebooks = _inputs(n, d, r, k, dtype)
    _, indices, _ = fastvae.residual_quantize(x, codebooks)
    sums, counts = residual_segment_sums(x, codebooks, indices)
    residual = x.double()
    for stage in range(r):
        index = indices[:, stage]
        expected = torch.zeros(k, d, dtype=torch.float64).index_add_(0, index, residual)
        assert torch.equal(counts[stage], torch.bincount(index, minlength=k))
        torch.testing.assert_close(sums[stage].double(), expected, atol=1e-4 * max(1.0, n ** 0.5), rtol=1e-5)
        residual = residual - codebooks[stage].double()[index]


def test_residual_ema_layer_matches_sequential_ema_quantizers(backend):
    """One training call of an EMA residual layer moves each stage as a standalone EMA
    VectorQuantizer with the same state moves when fed that stage's residual."""
    requires(backend, "residual_quantize", "residual_quantize_backward", "residual_segment_sums",
             "vector_quantize", "segment_mean")
    r, k, d = 3, 6, 5
    layer = ResidualVectorQuantizer(r, k, d, beta=0.5, ema_decay=0.7)
    with torch.no_grad():
        for stage, codebook in zip(layer.stages, _inputs(1, d, r, k)[1]):
            stage.codebook.copy_(codebook)
            stage.ema_sum.copy_(codebook)
    singles = [VectorQuantizer(k, d, beta=0.5, ema_decay=0.7) for _ in range(r)]
    for single, stage in zip(singles, layer.stages):
        single.load_state_dict(stage.state_dict())
    searched = layer.codebooks().clone()  # the EMA moves the codebooks after the search
    x = torch.randn(80, d, requires_grad=True)
    _, indices, losses = layer(x)
    losses.sum().backward()
    residual = x.detach()
    for stage, (single, layer_stage) in enumerate(zip(singles, layer.stages)):
        _, single_indices, _ = single(residual)
        assert torch.equal(single_indices, indices[:, stage])
        residual = residual - searched[stage][single_indices]
        for name in ("codebook", "ema_sum", "ema_count", "usage_count"):
            torch.testing.assert_close(getattr(layer_stage, name), getattr(single, name), atol=1e-5, rtol=1e-5)
