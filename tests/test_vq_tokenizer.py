"""VQ column additions: the rotation estimator, kmeans (segment means), residual_quantize.

Every backend against float64 truths: autograd of the paper's rotation formula, a float64
Lloyd's from the same initial rows, R sequential float64 searches.
"""
import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae.ops.kmeans import _segment_mean
from helpers import TOLERANCES, requires


def rotation_trick(x, e):
    """The rotation trick as written in Fifty et al. (2024), section 4.2: autograd gives its gradient."""
    x_norm, e_norm = x.norm(dim=-1, keepdim=True), e.norm(dim=-1, keepdim=True)
    u, q = (x / x_norm).detach(), (e / e_norm).detach()
    w = F.normalize(u + q, dim=-1).detach()
    dot = lambda a, b: (a * b).sum(dim=-1, keepdim=True)  # noqa: E731
    return (x - 2 * dot(x, w) * w + 2 * dot(x, u) * q) * (e_norm / x_norm).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,d", [(200, 16, 8), (37, 5, 64), (9, 3, 3)])
def test_rotation_estimator_gradient(backend, dtype, n, k, d):
    requires(backend, "vector_quantize", "vector_quantize_rotation_backward")
    x = torch.randn(n, d).to(dtype).requires_grad_()
    codebook = torch.randn(k, d).to(dtype).requires_grad_()
    quantized, indices, loss = fastvae.vector_quantize(x, codebook, beta=0.3, estimator="rotation")
    ste_q, ste_i, ste_loss = fastvae.vector_quantize(x.detach(), codebook.detach(), beta=0.3)
    assert torch.equal(quantized.detach(), ste_q) and torch.equal(indices, ste_i) and torch.equal(loss.detach(), ste_loss)
    grad_q, grad_loss = torch.randn(n, d).to(dtype), torch.tensor(1.3, dtype=dtype)
    torch.autograd.backward([quantized, loss], [grad_q, grad_loss])

    x64, cb64 = x.detach().double().requires_grad_(), codebook.detach().double().requires_grad_()
    e = cb64[indices]
    q64 = rotation_trick(x64, e.detach())
    loss64 = F.mse_loss(e, x64.detach()) + 0.3 * F.mse_loss(x64, e.detach())
    torch.autograd.backward([q64, loss64], [grad_q.double(), grad_loss.double()])
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(q64.detach(), e.detach(), atol=1e-9, rtol=1e-9)  # the formula's value is e
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=4 * atol, rtol=4 * rtol)
    torch.testing.assert_close(codebook.grad.double(), cb64.grad, atol=atol * max(cb64.grad.abs().max().item(), 1e-3),
                               rtol=rtol)


def test_rotation_estimator_zero_input_row(backend):
    """|x| = 0: the direction is undefined, the gradient passes straight through."""
    requires(backend, "vector_quantize", "vector_quantize_rotation_backward")
    x = torch.randn(6, 4)
    x[2] = 0.0
    x.requires_grad_()
    codebook = torch.randn(5, 4)
    quantized, _, _ = fastvae.vector_quantize(x, codebook, estimator="rotation")
    grad = torch.randn(6, 4)
    (gx,) = torch.autograd.grad(quantized, x, grad)
    assert torch.isfinite(gx).all()
    torch.testing.assert_close(gx[2], grad[2])


def test_vector_quantize_estimator_checked():
    with pytest.raises(ValueError, match="estimator"):
        fastvae.vector_quantize(torch.randn(3, 2), torch.randn(4, 2), estimator="rotate")


@pytest.mark.parametrize("n,k,d", [(500, 7, 5), (64, 64, 3), (300, 20, 33)])
def test_segment_mean(backend, n, k, d):
    requires(backend, "segment_mean")
    x, indices = torch.randn(n, d), torch.randint(k - 1, (n,))  # the last segment is empty
    means, counts = _segment_mean(x, indices, k)
    sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, indices, x.double())
    assert torch.equal(counts, torch.bincount(indices, minlength=k))
    torch.testing.assert_close(means.double(), sums / counts.clamp_min(1)[:, None].double(), atol=1e-5, rtol=1e-5)
    assert (means[k - 1] == 0).all()
    again, _ = _segment_mean(x, indices, k)
    assert torch.equal(means, again)


def lloyd64(x, num_clusters, iters, seed):
    """float64 Lloyd's with kmeans' documented draws: randperm for the start, one randint per iteration."""
    generator = torch.Generator().manual_seed(seed)
    x64 = x.double()
    centroids = x64[torch.randperm(x.shape[0], generator=generator)[:num_clusters]]
    for _ in range(iters):
        indices = torch.cdist(x64, centroids).argmin(dim=1)
        counts = torch.bincount(indices, minlength=num_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, indices, x64)
        reseed = x64[torch.randint(x.shape[0], (num_clusters,), generator=generator)]
        centroids = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], reseed)
    return centroids, torch.cdist(x64, centroids).argmin(dim=1)


@pytest.mark.parametrize("n,k,d,iters", [(400, 6, 4, 5), (257, 16, 12, 3), (50, 50, 2, 2)])
def test_kmeans_matches_float64_lloyd(backend, n, k, d, iters):
    requires(backend, "nearest_code", "segment_mean")
    centres = 5 * torch.randn(k, d)
    x = centres[torch.randint(k, (n,))] + torch.randn(n, d)
    centroids, indices = fastvae.kmeans(x, k, iters=iters, generator=torch.Generator().manual_seed(3))
    expected, expected_indices = lloyd64(x, k, iters, seed=3)
    assert centroids.dtype == torch.float32 and centroids.shape == (k, d) and indices.shape == (n,)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(centroids.double(), expected, atol=1e-4, rtol=1e-4)
    again, _ = fastvae.kmeans(x, k, iters=iters, generator=torch.Generator().manual_seed(3))
    assert torch.equal(centroids, again), "kmeans must be deterministic for a given generator"


def test_kmeans_bad_input():
    with pytest.raises(ValueError, match="num_clusters"):
        fastvae.kmeans(torch.randn(5, 2), 6)
    with pytest.raises(ValueError, match="x must be 2-D"):
        fastvae.kmeans(torch.randn(5), 2)
    with pytest.raises(ValueError, match="iters"):
        fastvae.kmeans(torch.randn(5, 2), 2, iters=-1)


def sequential_residual64(x, codebooks, indices, beta, grad_q, grad_losses):
    """R textbook VQ stages in float64 on the given indices, and their autograd gradients."""
    x64 = x.detach().double().requires_grad_()
    cb64 = codebooks.detach().double().requires_grad_()
    residual, total, losses = x64, 0, []
    for r in range(cb64.shape[0]):
        e = cb64[r][indices[..., r]]
        losses.append(F.mse_loss(e, residual.detach()) + beta * F.mse_loss(residual, e.detach()))
        total = total + e
        residual = residual - e.detach()
    quantized = x64 + (total - x64).detach()
    losses = torch.stack(losses)
    torch.autograd.backward([quantized, losses], [grad_q.double(), grad_losses.double()])
    return quantized, losses, x64.grad, cb64.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,r,k", [((300, 8), 3, 16), ((2, 7, 64), 4, 5), ((11, 3), 1, 9)])
def test_residual_quantize_matches_sequential_reference(backend, dtype, shape, r, k):
    requires(backend, "residual_quantize")
    x = torch.randn(shape).to(dtype)
    codebooks = (torch.randn(r, k, shape[-1]) * torch.logspace(0, -1, r)[:, None, None]).to(dtype)
    quantized, indices, losses = fastvae.residual_quantize(x, codebooks, beta=0.2)
    assert quantized.shape == x.shape and indices.shape == shape[:-1] + (r,) and losses.shape == (r,)
    # indices: each stage the float64 nearest code of the float64 residual (given the earlier stages' choices)
    residual = x.double().reshape(-1, shape[-1])
    flat_indices = indices.reshape(-1, r)
    for stage in range(r):
        dist = torch.cdist(residual, codebooks[stage].double())
        chosen = dist.gather(1, flat_indices[:, stage:stage + 1]).squeeze(1)
        assert (chosen <= dist.min(dim=1).values * (1 + 1e-3) + 1e-6).all(), f"stage {stage} not nearest"
        residual = residual - codebooks[stage].double()[flat_indices[:, stage]]
    grad_q, grad_losses = torch.randn(shape).to(dtype), torch.rand(r).to(dtype) + 0.5
    q64, losses64, gx64, gcb64 = sequential_residual64(x, codebooks, indices, 0.2, grad_q, grad_losses)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(quantized.double(), q64.detach(), atol=atol * r, rtol=rtol)
    torch.testing.assert_close(losses.double(), losses64.detach(), atol=atol, rtol=rtol * r)
    requires(backend, "residual_quantize_backward")
    xg, cbg = x.clone().requires_grad_(), codebooks.clone().requires_grad_()
    out, _, out_losses = fastvae.residual_quantize(xg, cbg, beta=0.2)
    torch.autograd.backward([out, out_losses], [grad_q, grad_losses])
    torch.testing.assert_close(xg.grad.double(), gx64, atol=atol * r, rtol=rtol)
    torch.testing.assert_close(cbg.grad.double(), gcb64, atol=atol * max(gcb64.abs().max().item(), 1e-3), rtol=rtol)


def test_residual_quantize_one_stage_is_vector_quantize(backend):
    requires(backend, "residual_quantize", "vector_quantize")
    x, codebook = torch.randn(100, 6), torch.randn(12, 6)
    quantized, indices, losses = fastvae.residual_quantize(x, codebook[None], beta=0.4)
    ref_q, ref_i, ref_loss = fastvae.vector_quantize(x, codebook, beta=0.4)
    assert torch.equal(indices[:, 0], ref_i) and torch.equal(quantized, ref_q)
    torch.testing.assert_close(losses[0], ref_loss)


def test_residual_quantize_bad_input():
    with pytest.raises(ValueError, match="codebooks"):
        fastvae.residual_quantize(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="dim"):
        fastvae.residual_quantize(torch.randn(4, 3), torch.randn(2, 5, 4))
    with pytest.raises(TypeError, match="beta"):
        fastvae.residual_quantize(torch.randn(4, 3), torch.randn(2, 5, 3), beta=None)
