"""Posterior layers for real pipelines: the per_sample KL reduction and DiagonalGaussian.

Every backend is checked against fastvae.reference in float64 and against float64
autograd of the textbook formulas; DiagonalGaussian also against diffusers'
DiagonalGaussianDistribution (values, gradients, sample statistics).
"""
import math

import pytest
import torch
from scipy import stats

import fastvae
from fastvae import reference
from helpers import DTYPES, as64, non_contiguous, randn, requires
from test_gaussian import assert_close, inputs, seed_tensor, textbook_kl

# Latent-like shapes: inner sizes that are and are not multiples of 4 (a Philox group)
# or of a block, one sample, empty samples, an empty batch.
PER_SAMPLE_SHAPES = [(3, 5, 9), (2, 1030), (4, 3, 4, 4), (2, 3, 7, 11), (5,), (1, 6), (3, 0), (0, 4)]


def per_sample(kl):
    return kl.reshape(kl.shape[0], math.prod(kl.shape[1:])).sum(dim=1)


# ---------------------------------------------------------------- reduction="per_sample"
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PER_SAMPLE_SHAPES)
def test_gaussian_kl_per_sample(backend, dtype, shape):
    requires(backend, "gaussian_kl", "gaussian_kl_backward")
    mu, logvar = inputs(shape, dtype, requires_grad=True)
    kl = fastvae.gaussian_kl(mu, logvar, reduction="per_sample")
    assert kl.shape == shape[:1] and kl.dtype == dtype
    mu64, logvar64 = (t.detach().double().requires_grad_() for t in (mu, logvar))
    kl64 = per_sample(textbook_kl(mu64, logvar64))
    assert_close(kl, kl64, dtype, scale=4)
    assert_close(kl, reference.gaussian_kl(*as64(mu, logvar), None, None, "per_sample"), dtype, scale=4)
    grad_kl = randn(*kl.shape, dtype=dtype)
    for g, g64 in zip(torch.autograd.grad(kl, (mu, logvar), grad_kl),
                      torch.autograd.grad(kl64, (mu64, logvar64), grad_kl.double())):
        assert_close(g, g64, dtype, scale=2)


@pytest.mark.parametrize("prior_shape", [(3, 5, 9), (9,), (3, 1, 1), ()])
def test_gaussian_kl_per_sample_with_prior(backend, prior_shape):
    requires(backend, "gaussian_kl", "gaussian_kl_backward")
    mu, logvar = inputs((3, 5, 9), torch.float32, requires_grad=True)
    prior_mu, prior_logvar = randn(*prior_shape, requires_grad=True), randn(*prior_shape, scale=0.5, requires_grad=True)
    leaves = (mu, logvar, prior_mu, prior_logvar)
    kl = fastvae.gaussian_kl(non_contiguous(mu), logvar, prior_mu, prior_logvar, reduction="per_sample")
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    kl64 = per_sample(textbook_kl(*leaves64))
    assert_close(kl, kl64, torch.float32, scale=4)
    grad_kl = randn(3)
    for g, g64 in zip(torch.autograd.grad(kl, leaves, grad_kl), torch.autograd.grad(kl64, leaves64, grad_kl.double())):
        assert_close(g, g64, torch.float32, scale=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PER_SAMPLE_SHAPES)
def test_reparameterize_kl_per_sample(backend, dtype, shape):
    requires(backend, "reparameterize_kl", "reparameterize_kl_backward")
    mu, logvar = inputs(shape, dtype, requires_grad=True)
    z, kl = fastvae.reparameterize_kl(mu, logvar, reduction="per_sample", generator=torch.Generator().manual_seed(5))
    seed = torch.randint(2**63 - 1, (1,), dtype=torch.int64, generator=torch.Generator().manual_seed(5))
    z_ref, kl_ref = reference.reparameterize_kl(*as64(mu, logvar), seed, "per_sample")
    assert kl.shape == shape[:1]
    assert_close(z, z_ref, dtype, scale=2)  # the same noise stream whatever the reduction
    assert_close(kl, kl_ref, dtype, scale=4)
    grad_z, grad_kl = randn(*shape, dtype=dtype), randn(*kl.shape, dtype=dtype)
    grads = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl))
    expected = reference.reparameterize_kl_backward(*as64(grad_z, grad_kl, mu, logvar, z), seed, "per_sample")
    for g, e in zip(grads, expected):
        assert_close(g, e, dtype, scale=4)


def test_per_sample_gradient_may_be_expanded(backend):
    """kl.sum().backward() hands the kernels an expanded (stride 0) per-sample gradient."""
    requires(backend, "gaussian_kl", "gaussian_kl_backward")
    mu, logvar = inputs((4, 3, 5), torch.float32, requires_grad=True)
    fastvae.gaussian_kl(mu, logvar, reduction="per_sample").sum().backward()
    mu64, logvar64 = as64(mu, logvar)
    assert_close(mu.grad, mu64, torch.float32)
    assert_close(logvar.grad, 0.5 * (logvar64.exp() - 1.0), torch.float32)


def test_per_sample_needs_a_batch_dimension():
    with pytest.raises(ValueError, match="per_sample"):
        fastvae.gaussian_kl(torch.tensor(0.5), torch.tensor(0.1), reduction="per_sample")
    with pytest.raises(ValueError, match="reduction"):
        fastvae.categorical_kl(torch.randn(3, 4), reduction="per_sample")  # a Gaussian reduction only


def test_per_sample_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        mu = torch.empty(6, 4, 8, 8)
        assert fastvae.gaussian_kl(mu, mu, reduction="per_sample").shape == (6,)
        assert fastvae.reparameterize_kl(mu, mu, reduction="per_sample")[1].shape == (6,)


# ---------------------------------------------------------------- DiagonalGaussian against diffusers
def diffusers_class():
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    return vae.DiagonalGaussianDistribution


def encoder_output(shape=(3, 8, 5, 6), dtype=torch.float64, requires_grad=True):
    """Encoder parameters (B, 2C, H, W) with some log-variances outside the clamp [-30, 20]."""
    params = torch.randn(shape, dtype=dtype)
    params[:, shape[1] // 2:] *= 2.0
    params[0, shape[1] // 2, 0, :2] = torch.tensor([-40.0, 25.0], dtype=dtype)
    return params.requires_grad_(requires_grad)


@pytest.mark.parametrize("deterministic", [False, True])
def test_diagonal_gaussian_matches_diffusers(backend, deterministic):
    requires(backend, "gaussian_kl", "gaussian_kl_backward")
    Reference = diffusers_class()
    params = encoder_output(dtype=torch.float32)
    ours, theirs = fastvae.nn.DiagonalGaussian(params, deterministic=deterministic), Reference(
        params, deterministic=deterministic)
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
    torch.testing.assert_close(ours.mode(), theirs.mode())
    x = torch.randn(3, 4, 5, 6)
    if deterministic:
        assert torch.equal(ours.kl(), torch.zeros(3)) and torch.equal(ours.nll(x), torch.zeros(3))
        torch.testing.assert_close(ours.sample(), theirs.sample())
        return
    other_params = encoder_output(dtype=torch.float32, requires_grad=False)
    other, other_theirs = fastvae.nn.DiagonalGaussian(other_params), Reference(other_params)
    for value, expected in ((ours.kl(), theirs.kl()), (ours.kl(other), theirs.kl(other_theirs)),
                            (ours.nll(x), theirs.nll(x)), (ours.nll(x, [1, 2]), theirs.nll(x, [1, 2])),
                            (ours.nll(x, dims=[1, 2, 3]), theirs.nll(x, dims=[1, 2, 3]))):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-4)
        grads = torch.autograd.grad(value.sum(), params, retain_graph=True)[0]
        torch.testing.assert_close(grads, torch.autograd.grad(expected.sum(), params, retain_graph=True)[0],
                                   rtol=1e-5, atol=1e-5)


def test_diagonal_gaussian_kl_in_float64_against_the_reference(backend):
    requires(backend, "gaussian_kl")
    params = encoder_output(dtype=torch.float32, requires_grad=False)
    posterior = fastvae.nn.DiagonalGaussian(params)
    mean64, logvar64 = as64(posterior.mean, posterior.logvar)
    for reduction in ("per_sample", "none", "sum", "mean", "batchmean"):
        assert_close(posterior.kl(reduction=reduction),
                     reference.gaussian_kl(mean64, logvar64, None, None, reduction), torch.float32, scale=4)


def test_diagonal_gaussian_sample_gradients_match_diffusers(backend):
    """Same noise (recovered from our sample), same gradients, clamp included."""
    requires(backend, "reparameterize", "reparameterize_backward")
    params = encoder_output(dtype=torch.float32)
    z = fastvae.nn.DiagonalGaussian(params).sample(generator=torch.Generator().manual_seed(1))
    mean, logvar = torch.chunk(params, 2, dim=1)
    seed = torch.randint(2**63 - 1, (1,), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    eps = reference.normal_stream(seed, mean.shape, "cpu", torch.float64)
    mean64, logvar64 = mean.detach().double(), logvar.detach().double().clamp(-30, 20)
    assert_close(z, mean64 + (0.5 * logvar64).exp() * eps, torch.float32, scale=2)
    grad_z = torch.randn_like(z)
    grad = torch.autograd.grad(z, params, grad_z)[0]
    params64 = params.detach().double().requires_grad_()
    m, lv = torch.chunk(params64, 2, dim=1)
    z64 = m + (0.5 * lv.clamp(-30, 20)).exp() * eps
    assert_close(grad, torch.autograd.grad(z64, params64, grad_z.double())[0], torch.float32, scale=2)


def test_diagonal_gaussian_kl_after_sample(backend):
    """kl() after sample() (the fused pass's KL) has the values and gradients of kl() alone,
    also when sample() ran without grad."""
    requires(backend, "reparameterize_kl", "reparameterize_kl_backward", "gaussian_kl", "gaussian_kl_backward")
    params = encoder_output(dtype=torch.float32)
    alone = fastvae.nn.DiagonalGaussian(params).kl()
    expected = torch.autograd.grad(alone.sum(), params)[0]
    posterior = fastvae.nn.DiagonalGaussian(params)
    z = posterior.sample(generator=torch.Generator().manual_seed(6))
    kl = posterior.kl()
    torch.testing.assert_close(kl, alone)
    torch.testing.assert_close(torch.autograd.grad(kl.sum(), params, retain_graph=True)[0], expected)
    both = torch.autograd.grad(z.sum() + kl.sum(), params)[0]  # one node, both gradients
    mean, logvar = torch.chunk(params, 2, dim=1)
    z_alone = fastvae.reparameterize(mean, logvar.clamp(-30, 20), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(both, torch.autograd.grad(z_alone.sum(), params)[0] + expected)
    with torch.no_grad():
        posterior.sample()
    assert posterior.kl().requires_grad


def test_diagonal_gaussian_sample_statistics(backend):
    """Our samples and diffusers' have the same law N(mean, var) (two-sample KS per element group)."""
    requires(backend, "reparameterize")
    Reference = diffusers_class()
    params = torch.cat([torch.full((4000, 1, 2, 2), 1.5), torch.full((4000, 1, 2, 2), -0.7)], dim=1)
    ours = fastvae.nn.DiagonalGaussian(params).sample(generator=torch.Generator().manual_seed(2))
    theirs = Reference(params).sample(generator=torch.Generator().manual_seed(3))
    assert stats.ks_2samp(ours.flatten().numpy(), theirs.flatten().numpy()).pvalue > 1e-3
    standardized = ((ours - 1.5) / math.exp(-0.35)).flatten().numpy()
    assert stats.kstest(standardized, "norm").pvalue > 1e-3


def test_diagonal_gaussian_on_other_dims_and_5d_latents(backend):
    requires(backend, "gaussian_kl")
    params = torch.randn(2, 3, 4, 6, 10)  # (B, C, T, H, 2 * W): chunks along the last dim
    posterior = fastvae.nn.DiagonalGaussian(params, dim=-1)
    mean, logvar = params[..., :5], params[..., 5:]
    assert torch.equal(posterior.mean, mean)
    kl = posterior.kl()
    assert kl.shape == (2,)  # every non-batch dimension summed (diffusers' [1, 2, 3] would leave W)
    assert_close(kl, per_sample(textbook_kl(*as64(mean, logvar))), torch.float32, scale=4)
    with pytest.raises(ValueError, match="reduction"):
        posterior.kl(reduction="elementwise")
    with pytest.raises(TypeError, match="other"):
        posterior.kl(other=torch.zeros(1))


@pytest.mark.parametrize("parameters, dim, error, message", [
    (torch.randn(2, 3, 4), 1, ValueError, "size there must be even"),
    (torch.randn(2, 0, 4), 1, ValueError, "size there must be even"),
    (torch.randn(2, 4), 2, ValueError, "dim=2 is out of range"),
    (torch.tensor(1.0), 0, ValueError, "dim=0 is out of range"),
    (torch.ones(2, 4, dtype=torch.long), 1, TypeError, "parameters must be a float"),
])
def test_diagonal_gaussian_checks_its_parameters(parameters, dim, error, message):
    """An encoder output that cannot hold a mean and a log-variance is refused when the
    posterior is made, naming ``parameters`` (not later by the KL, naming its internals)."""
    with pytest.raises(error, match=message):
        fastvae.nn.DiagonalGaussian(parameters, dim=dim)


# ---------------------------------------------------------------- GumbelQuantizer against taming
def taming_kl(logits, kl_weight):
    """taming GumbelQuantize's loss: kl_weight * sum(qy * log(qy * K + 1e-10), dim=1).mean()."""
    qy = torch.softmax(logits, dim=1)
    return kl_weight * torch.sum(qy * torch.log(qy * logits.shape[1] + 1e-10), dim=1).mean()


def quantizer_and_input(**options):
    layer = fastvae.nn.GumbelQuantizer(6, 37, 5, **options)
    return layer, torch.randn(2, 6, 3, 4)


@pytest.mark.parametrize("straight_through", [True, False], ids=["hard", "soft"])
def test_gumbel_quantizer_training_matches_the_reference(backend, straight_through):
    requires(backend, "gumbel_quantize_kl", "gumbel_quantize_kl_backward")
    layer, x = quantizer_and_input(tau=0.7, straight_through=straight_through, kl_weight=0.3)
    torch.manual_seed(7)
    quantized, indices, loss = layer(x)
    torch.manual_seed(7)
    seed = torch.randint(2**63 - 1, (1,), dtype=torch.int64)  # the draw of ops' draw_seed
    logits64 = torch.einsum("bchw,kc->bhwk", x.double(), layer.proj.weight.double()) + layer.proj.bias.double()
    sample = reference.gumbel_softmax(logits64, seed, 0.7, straight_through, 3)
    expected = torch.einsum("bhwk,kd->bdhw", sample, layer.embed.weight.double())
    assert quantized.shape == (2, 5, 3, 4) and indices.shape == (2, 3, 4)
    assert_close(quantized, expected, torch.float32, scale=4)
    assert torch.equal(indices, sample.argmax(dim=-1))
    assert_close(loss, taming_kl(logits64.movedim(-1, 1), 0.3), torch.float32, scale=4)
    (quantized.square().sum() + loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("straight_through", [True, False], ids=["hard", "soft"])
def test_gumbel_quantizer_gradients_match_the_unfused_textbook_step(backend, straight_through):
    """The layer's loss (the KL taken in the fused op's pass) equals the separate
    categorical_kl's, and the gradients of a training step reach x and every parameter as
    float64 autograd of the textbook step gives them: gumbel_softmax (straight-through when
    hard) mixed with the codebook, plus kl_weight * mean_positions sum_k p log(p K)."""
    requires(backend, "gumbel_quantize_kl", "gumbel_quantize_kl_backward", "categorical_kl")
    layer, x = quantizer_and_input(tau=0.7, straight_through=straight_through, kl_weight=0.3)
    x.requires_grad_()
    torch.manual_seed(7)
    quantized, _, loss = layer(x)
    grad = torch.randn(quantized.shape)
    params = (x, layer.proj.weight, layer.proj.bias, layer.embed.weight)
    grads = torch.autograd.grad((quantized * grad).sum() + loss, params)
    logits = layer.proj(x.movedim(1, -1))
    torch.testing.assert_close(loss, 0.3 * fastvae.categorical_kl(logits, dim=-1, reduction="mean"))

    torch.manual_seed(7)
    seed = torch.randint(2**63 - 1, (1,), dtype=torch.int64)
    x64, weight, bias, codes = [t.detach().double().requires_grad_() for t in params]
    logits64 = torch.einsum("bchw,kc->bhwk", x64, weight) + bias
    sample = reference.gumbel_softmax(logits64, seed, 0.7, False, 3)
    if straight_through:
        sample = reference.gumbel_softmax(logits64, seed, 0.7, True, 3).detach() + sample - sample.detach()
    quantized64 = torch.einsum("bhwk,kd->bdhw", sample, codes)
    log_p = torch.log_softmax(logits64, dim=-1)
    loss64 = 0.3 * (log_p.exp() * (log_p + math.log(37))).sum(dim=-1).mean()
    expected = torch.autograd.grad((quantized64 * grad.double()).sum() + loss64, (x64, weight, bias, codes))
    assert_close(loss, loss64, torch.float32, scale=4)
    for got, want in zip(grads, expected):  # x, proj.weight, proj.bias, embed.weight
        assert_close(got, want, torch.float32, scale=16)


def test_gumbel_quantizer_eval_is_the_argmax_without_noise(backend):
    requires(backend, "categorical_kl")
    layer, x = quantizer_and_input()
    layer.eval()
    quantized, indices, loss = layer(x)
    logits = layer.proj(x.movedim(1, -1))
    assert torch.equal(indices, logits.argmax(dim=-1))
    assert torch.equal(quantized, layer.embed.weight[indices].movedim(-1, 1))
    torch.testing.assert_close(layer(x)[0], quantized)  # deterministic
    torch.testing.assert_close(loss, taming_kl(logits.movedim(-1, 1), 5e-4), rtol=1e-4, atol=1e-9)


def test_gumbel_quantizer_learned_and_annealed_tau(backend):
    requires(backend, "gumbel_quantize_kl", "gumbel_quantize_kl_backward")
    layer, x = quantizer_and_input(learn_tau=True, tau=0.9, straight_through=False)
    assert isinstance(layer.tau, torch.nn.Parameter)
    quantized, _, loss = layer(x)
    (quantized.square().sum() + loss).backward()
    assert layer.tau.grad is not None and torch.isfinite(layer.tau.grad) and layer.tau.grad != 0
    annealed, _ = quantizer_and_input(tau=2.0)
    annealed.tau = 0.25  # a schedule sets the attribute between steps
    torch.manual_seed(3)
    soft_low = annealed(x)[0]
    assert soft_low.shape == (2, 5, 3, 4)


def test_gumbel_quantizer_taming_outputs_and_channel_last(backend):
    requires(backend, "gumbel_softmax", "categorical_kl")
    layer, x = quantizer_and_input(taming_outputs=True)
    layer.eval()
    z_q, loss, (_, _, indices) = layer(x)
    assert z_q.shape == (2, 5, 3, 4) and loss.dim() == 0 and indices.shape == (2, 3, 4)
    last = fastvae.nn.GumbelQuantizer(6, 37, 5, channel_dim=-1)
    last.load_state_dict(layer.state_dict())
    last.eval()
    quantized, last_indices, _ = last(x.movedim(1, -1))
    assert torch.equal(last_indices, indices) and torch.equal(quantized, z_q.movedim(1, -1))
    with pytest.raises(ValueError, match="in_channels"):
        last(x)


@pytest.mark.parametrize("options, x, error, message", [
    ({}, torch.ones(2, 6, 3, 4, dtype=torch.long), TypeError, "x must be a float"),
    ({"channel_dim": 5}, torch.randn(2, 6, 3, 4), ValueError, "channel_dim=5 is out of range"),
])
def test_gumbel_quantizer_checks_its_input_by_name(options, x, error, message):
    layer = fastvae.nn.GumbelQuantizer(6, 37, 5, **options)
    with pytest.raises(error, match=message):
        layer(x)


@pytest.mark.parametrize("arguments, error, message", [
    ((6, 37.0, 5), TypeError, "num_codes must be an int"),
    ((0, 37, 5), ValueError, "in_channels must be >= 1"),
    ((6, 37, -1), ValueError, "dim must be >= 1"),
])
def test_gumbel_quantizer_checks_its_sizes_by_name(arguments, error, message):
    with pytest.raises(error, match=message):
        fastvae.nn.GumbelQuantizer(*arguments)


def test_gumbel_quantizer_repr_is_one_line_with_a_learned_tau():
    learned = repr(fastvae.nn.GumbelQuantizer(6, 37, 5, learn_tau=True))
    assert "learn_tau=True" in learned and "Parameter containing" not in learned
    assert "tau=0.5," in repr(fastvae.nn.GumbelQuantizer(6, 37, 5, tau=0.5))


def test_gumbel_quantizer_kl_against_dalle_pytorch(backend):
    """DALLE-pytorch 1.6.6 DiscreteVAE's KL (read from its source; the package does not
    install here): F.kl_div(log(1/K) of shape (1,), log_softmax over codes, 'batchmean',
    log_target=True), i.e. the sum over every position, which is N times ours."""
    requires(backend, "categorical_kl")
    layer, x = quantizer_and_input(kl_weight=1.0)
    layer.eval()
    loss = layer(x)[2]
    logits = layer.proj(x.movedim(1, -1)).movedim(-1, 1).detach()  # the dVAE encoder's (B, K, H, W)
    log_qy = torch.log_softmax(logits.flatten(2).transpose(1, 2), dim=-1)
    log_uniform = torch.log(torch.tensor([1.0 / 37]))
    dalle = torch.nn.functional.kl_div(log_uniform, log_qy, None, None, "batchmean", log_target=True)
    torch.testing.assert_close(loss * 2 * 3 * 4, dalle, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fastvae.categorical_kl(logits, dim=1, reduction="sum"), dalle, rtol=1e-5, atol=1e-6)
