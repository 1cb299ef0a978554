"""VectorQuantizer's tokenizer options, ResidualVectorQuantizer, and checkpoints of the peers.

Peer checks build, train and save a quantizer with the real package (vector-quantize-pytorch,
diffusers), load it with ``from_state_dict`` and compare indices, values and loss.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae.nn import ResidualVectorQuantizer, VectorQuantizer
from helpers import requires


# ---------------------------------------------------------------- small user-facing fixes
def test_load_state_dict_without_usage_count():
    layer = VectorQuantizer(8, 3)
    state = {k: v for k, v in layer.state_dict().items() if k != "usage_count"}
    fresh = VectorQuantizer(8, 3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.codebook, layer.codebook) and fresh.usage_count.sum() == 0


def test_load_state_dict_without_the_running_usage_of_dead_code_restarts():
    """Without EMA, ``ema_count`` is the running usage that restarts read: a usage statistic a
    plain checkpoint lacks. It starts as a new layer's (no code restarted at once)."""
    plain = VectorQuantizer(8, 4).state_dict()
    layer = VectorQuantizer(8, 4, dead_code_threshold=0.5)
    layer.load_state_dict(plain)
    assert torch.equal(layer.codebook, plain["codebook"])
    torch.testing.assert_close(layer.ema_count, torch.ones(8))
    layer(torch.randn(30, 4))
    assert torch.equal(layer.codebook, plain["codebook"])


@pytest.mark.parametrize("options", [{"ema_decay": 0.99}, {"dead_code_threshold": 1.0}, {"kmeans_init": True},
                                     {"ema_decay": 0.9, "ema_debias": True, "dead_code_threshold": 0.5}])
def test_from_state_dict_starts_the_statistics_a_checkpoint_lacks(options):
    """A gradient-trained taming checkpoint fine-tuned with EMA, restarts or k-means options:
    the layer starts from the checkpoint's codes, each counted once (as a new layer's), and
    k-means does not fit them again."""
    codebook = torch.randn(16, 4)
    layer = VectorQuantizer.from_state_dict({"quantize.embedding.weight": codebook}, layout="taming",
                                            prefix="quantize.", **options)
    assert torch.equal(layer.codebook, codebook)
    if "ema_decay" in options and "ema_debias" not in options:
        torch.testing.assert_close(layer.ema_sum / layer.ema_count[:, None], codebook)
    if "kmeans_init" in options:
        layer(torch.randn(2, 4, 5, 5))
        assert bool(layer.initialized) and torch.equal(layer.codebook, codebook)


def test_perplexity_is_a_tensor_before_the_first_call():
    layer = VectorQuantizer(8, 3)
    assert isinstance(layer.perplexity, torch.Tensor) and torch.isnan(layer.perplexity)
    assert "perplexity" not in layer.state_dict()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channel_first_output_keeps_the_input_memory_format(memory_format):
    layer = VectorQuantizer(20, 6, channel_dim=1)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=memory_format)
    quantized, indices, _ = layer(x)
    assert quantized.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(quantized, layer.lookup(indices))


def test_lookup_channel_last_and_projected():
    layer = VectorQuantizer(10, 6, codebook_dim=3)
    x = torch.randn(4, 9, 6)
    quantized, indices, _ = layer(x)
    torch.testing.assert_close(layer.lookup(indices), quantized)
    with pytest.raises(TypeError, match="indices"):
        layer.lookup(indices.float())


def test_codebook_init_options():
    torch.manual_seed(0)
    assert VectorQuantizer(1000, 64).codebook.abs().max() <= 1e-3
    normal = VectorQuantizer(1000, 64, ema_decay=0.9, codebook_init="normal")
    assert abs(normal.codebook.std().item() - 1) < 0.02 and (normal.ema_count == 0).all()
    kaiming = VectorQuantizer(1000, 64, codebook_init="kaiming")
    bound = math.sqrt(6 / (1000 * 64))
    assert kaiming.codebook.abs().max() <= bound and kaiming.codebook.abs().max() > 0.9 * bound
    with pytest.raises(ValueError, match="codebook_init"):
        VectorQuantizer(4, 2, codebook_init="xavier")


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_dead_code_threshold_above_initial_count_keeps_codes_on_first_call(ema_decay):
    """Threshold 2 > the initial count 1: the first call used to restart every code."""
    layer = VectorQuantizer(16, 4, ema_decay=ema_decay, dead_code_threshold=2.0)
    before = layer.codebook.detach().clone()
    _, indices, _ = layer(torch.randn(64, 4))
    unused = torch.bincount(indices, minlength=16) == 0
    assert unused.any()
    # a restarted code would hold an input vector (norm ~2, not ~1/16)
    torch.testing.assert_close(layer.codebook.detach()[unused], before[unused], atol=1e-4, rtol=1e-3)
    if ema_decay is None:
        assert torch.equal(layer.codebook.detach(), before)


# ---------------------------------------------------------------- options
def test_kmeans_init_fits_the_first_training_batch(backend):
    requires(backend, "nearest_code", "segment_mean")
    layer = VectorQuantizer(8, 3, kmeans_init=True, kmeans_iters=4, ema_decay=0.9)
    x = 4 * torch.randn(8, 3)[torch.randint(8, (256,))] + 0.1 * torch.randn(256, 3)
    state = torch.get_rng_state()
    layer(x)
    torch.set_rng_state(state)
    centroids, indices = fastvae.kmeans(x, 8, iters=4)
    counts = torch.bincount(indices, minlength=8).float()
    assert bool(layer.initialized)
    # one EMA step from the fitted state (counts, sums = centroids * counts)
    expected_count = 0.9 * counts + 0.1 * counts
    torch.testing.assert_close(layer.ema_count, expected_count)
    codebook = layer.codebook.clone()
    layer(x)  # not fitted again
    assert bool(layer.initialized)
    loaded = VectorQuantizer.from_state_dict(layer.state_dict(), ema_decay=0.9)
    assert loaded.kmeans_init and bool(loaded.initialized)
    torch.testing.assert_close(codebook, codebook)
    with pytest.raises(ValueError, match="kmeans_init"):
        VectorQuantizer(8, 3, kmeans_init=True)(torch.randn(4, 3))


def test_cosine_codes_stay_on_the_sphere(backend):
    requires(backend, "vector_quantize")
    layer = VectorQuantizer(16, 5, ema_decay=0.8, cosine=True)
    torch.testing.assert_close(layer.codebook.norm(dim=1), torch.ones(16))
    for _ in range(3):
        x = 3 * torch.randn(100, 5)
        quantized, indices, loss = layer(x)
        torch.testing.assert_close(quantized.norm(dim=1), torch.ones(100))
        torch.testing.assert_close(layer.codebook.norm(dim=1), torch.ones(16))
    layer.eval()
    x = torch.randn(50, 5)
    quantized, indices, loss = layer(x)
    ref_q, ref_i, _ = fastvae.vector_quantize(F.normalize(x, dim=1), layer.codebook)
    assert torch.equal(indices, ref_i) and torch.equal(quantized, ref_q)


def test_codebook_dim_projects(backend):
    requires(backend, "vector_quantize", "vector_quantize_backward")
    layer = VectorQuantizer(32, 16, codebook_dim=4)
    assert layer.codebook.shape == (32, 4) and layer.project_in.weight.shape == (4, 16)
    x = torch.randn(3, 10, 16, requires_grad=True)
    quantized, indices, loss = layer(x)
    z = layer.project_in(x)
    ref_q, ref_i, ref_loss = fastvae.vector_quantize(z, layer.codebook)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(quantized, layer.project_out(ref_q))
    (quantized.sum() + loss).backward()
    assert layer.project_in.weight.grad is not None and layer.project_out.weight.grad is not None


def test_ema_debias_first_step_is_the_batch_mean(backend):
    requires(backend, "vector_quantize")
    layer = VectorQuantizer(4, 2, ema_decay=0.99, ema_debias=True, ema_eps=1e-9)
    with torch.no_grad():
        layer.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [50.0, 50.0]]))
    x = torch.cat([torch.randn(30, 2), torch.tensor([10.0, 0.0]) + torch.randn(20, 2)])
    _, indices, _ = layer(x)
    for code in (0, 1):  # debiased: the mean of its rows, not 1% of the way there
        torch.testing.assert_close(layer.codebook[code], x[indices == code].mean(0), atol=1e-4, rtol=1e-4)
    assert int(layer.ema_steps) == 1
    with pytest.raises(ValueError, match="ema_debias"):
        VectorQuantizer(4, 2, ema_debias=True)


@pytest.mark.parametrize("options", [{"ema_debias": True}, {"codebook_init": "normal"}])
def test_ema_from_zero_keeps_its_codes_through_empty_batches(backend, options):
    """Averages that start at zero have nothing to average after empty batches (0 / 0): the
    codes stay, and the first non-empty batch moves them as usual."""
    requires(backend, "vector_quantize", "segment_mean")
    layer = VectorQuantizer(4, 2, ema_decay=0.9, **options)
    initial = layer.codebook.clone()
    for _ in range(2):
        layer(torch.randn(0, 2))
    assert torch.equal(layer.codebook, initial)
    layer(torch.randn(20, 2))
    assert torch.isfinite(layer.codebook).all() and not torch.equal(layer.codebook, initial)


def test_rotation_estimator_in_the_layer(backend):
    requires(backend, "vector_quantize", "vector_quantize_rotation_backward")
    layer = VectorQuantizer(12, 6, estimator="rotation")
    x = torch.randn(40, 6, requires_grad=True)
    quantized, indices, loss = layer(x)
    (gx,) = torch.autograd.grad(quantized.sum() + loss, x)
    x2 = x.detach().clone().requires_grad_()
    q2, _, l2 = fastvae.vector_quantize(x2, layer.codebook, estimator="rotation")
    (gx2,) = torch.autograd.grad(q2.sum() + l2, x2)
    torch.testing.assert_close(gx, gx2)
    assert "estimator='rotation'" in repr(layer)


def test_legacy_beta_weights_the_codebook_term(backend):
    requires(backend, "vector_quantize", "vector_quantize_backward")
    layer = VectorQuantizer(10, 4, beta=0.3, legacy_beta=True)
    with torch.no_grad():
        layer.codebook.normal_()
    x = torch.randn(50, 4, requires_grad=True)
    _, indices, loss = layer(x)
    gx, gcb = torch.autograd.grad(loss, (x, layer.codebook))
    x64, cb64 = x.detach().double().requires_grad_(), layer.codebook.detach().double().requires_grad_()
    e = cb64[indices]
    ref = F.mse_loss(e.detach(), x64) + 0.3 * F.mse_loss(e, x64.detach())  # taming legacy=True
    ref_gx, ref_gcb = torch.autograd.grad(ref, (x64, cb64))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), ref_gx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gcb.double(), ref_gcb, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- residual VQ
def test_residual_layer_matches_the_op_and_options(backend):
    requires(backend, "residual_quantize", "residual_quantize_backward")
    layer = ResidualVectorQuantizer(4, 16, 6, beta=0.5, channel_dim=1)
    with torch.no_grad():
        for r, stage in enumerate(layer.stages):
            stage.codebook.normal_().mul_(0.5**r)
    x = torch.randn(2, 6, 9, requires_grad=True)
    quantized, indices, losses = layer(x)
    ref_q, ref_i, ref_l = fastvae.residual_quantize(x.movedim(1, -1), layer.codebooks(), beta=0.5)
    assert torch.equal(indices, ref_i) and indices.shape == (2, 9, 4) and quantized.is_contiguous()
    torch.testing.assert_close(quantized, ref_q.movedim(-1, 1))
    torch.testing.assert_close(layer.lookup(indices), quantized)
    (quantized.sum() + losses.sum()).backward()
    assert all(stage.codebook.grad is not None for stage in layer.stages)
    q2, i2, l2 = layer(x, num_quantizers=2)
    assert i2.shape == (2, 9, 2) and l2.shape == (2,) and torch.equal(i2, indices[..., :2])
    with pytest.raises(ValueError, match="num_quantizers"):
        layer(x, num_quantizers=5)
    assert layer.perplexity.shape == (4,)


def test_residual_quantize_dropout_draws_stage_counts(backend):
    requires(backend, "residual_quantize")
    layer = ResidualVectorQuantizer(4, 8, 3, quantize_dropout=True)
    seen = {layer(torch.randn(10, 3))[1].shape[-1] for _ in range(30)}
    assert seen == {1, 2, 3, 4}
    layer.eval()
    assert layer(torch.randn(10, 3))[1].shape[-1] == 4


def test_residual_shared_codebook_and_ema(backend):
    requires(backend, "residual_quantize", "residual_quantize_backward")
    shared = ResidualVectorQuantizer(3, 8, 4, shared_codebook=True)
    assert len(shared.stages) == 1
    x = torch.randn(20, 4)
    quantized, indices, losses = shared(x)
    losses.sum().backward()
    assert shared.stages[0].codebook.grad is not None
    ema = ResidualVectorQuantizer(2, 8, 4, ema_decay=0.5, dead_code_threshold=0.5)
    before = ema.codebooks().clone()
    _, indices, losses = ema(x)
    assert not torch.equal(ema.codebooks(), before)  # the EMA moved the stages
    assert all(stage.usage_count.sum() == 20 for stage in ema.stages)


def test_residual_kmeans_init_per_stage(backend):
    requires(backend, "residual_quantize", "segment_mean", "nearest_code")
    layer = ResidualVectorQuantizer(2, 4, 2, kmeans_init=True, ema_decay=0.9)
    x = torch.randn(4, 2)[torch.randint(4, (200,))] * 5 + 0.5 * torch.randn(200, 2)
    layer(x)
    assert all(bool(stage.initialized) for stage in layer.stages)
    assert layer.stages[1].codebook.norm(dim=1).max() < layer.stages[0].codebook.norm(dim=1).max()


# ---------------------------------------------------------------- checkpoints of the peers
def test_from_state_dict_fastvae_round_trip():
    layer = VectorQuantizer(12, 8, codebook_dim=4, ema_decay=0.9, ema_debias=True, channel_dim=1)
    layer(torch.randn(2, 8, 5))
    loaded = VectorQuantizer.from_state_dict(layer.state_dict(), ema_decay=0.9, channel_dim=1)
    assert loaded.codebook_dim == 4 and loaded.ema_debias
    for key, value in layer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(KeyError, match="prefix"):
        VectorQuantizer.from_state_dict({"embedding.weight": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="layout"):
        VectorQuantizer.from_state_dict({}, layout="sonnet")


@pytest.mark.parametrize("legacy", [True, False])
def test_from_state_dict_diffusers(legacy):
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    torch.manual_seed(1)
    peer = vae.VectorQuantizer(32, 8, beta=0.25, legacy=legacy)
    optimizer = torch.optim.SGD(peer.parameters(), lr=0.5)
    for _ in range(3):
        _, loss, _ = peer(torch.randn(2, 8, 4, 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad()
    state = {f"quantize.{k}": v for k, v in peer.state_dict().items()}
    layer = VectorQuantizer.from_state_dict(state, layout="taming", prefix="quantize.", beta=0.25, legacy_beta=legacy)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    peer_q, peer_loss, (_, _, peer_i) = peer(z)
    z2 = z.detach().clone().requires_grad_()
    quantized, indices, loss = layer(z2)
    assert torch.equal(indices.reshape(-1), peer_i.reshape(-1))
    torch.testing.assert_close(quantized, peer_q)
    torch.testing.assert_close(loss, peer_loss)
    torch.autograd.backward([peer_q, peer_loss], [torch.ones_like(peer_q), torch.tensor(3.0)])
    torch.autograd.backward([quantized, loss], [torch.ones_like(quantized), torch.tensor(3.0)])
    torch.testing.assert_close(z2.grad, z.grad)
    torch.testing.assert_close(layer.codebook.grad, peer.embedding.weight.grad)


@pytest.mark.parametrize("options", [{}, {"codebook_dim": 4, "use_cosine_sim": True}])
def test_from_state_dict_vector_quantize_pytorch(options):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(2)
    peer = vqp.VectorQuantize(dim=8, codebook_size=16, decay=0.8, commitment_weight=1.0, **options)
    peer.train()
    for _ in range(3):
        peer(torch.randn(2, 50, 8))
    cosine = options.get("use_cosine_sim", False)
    layer = VectorQuantizer.from_state_dict(peer.state_dict(), layout="vector_quantize_pytorch", cosine=cosine)
    assert layer.ema_decay == 0.8 and layer.estimator == "rotation"
    x = torch.randn(2, 30, 8)
    peer_q, peer_i, peer_loss = peer(x)
    quantized, indices, loss = layer(x)
    assert torch.equal(indices, peer_i)
    torch.testing.assert_close(quantized, peer_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, peer_loss.reshape(()), atol=1e-6, rtol=1e-5)
    # both took the same EMA step
    torch.testing.assert_close(layer.codebook, peer._codebook.embed[0], atol=1e-5, rtol=1e-5)
