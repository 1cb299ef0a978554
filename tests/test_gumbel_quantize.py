"""gumbel_quantize (the Gumbel-Softmax sample over codes mixed with a codebook, fused)
against the float64 reference on every backend, against gumbel_softmax's noise, and
GumbelQuantizer's taming checkpoints; gumbel_quantize_with_kl (the same with each row's KL
to the uniform prior, GumbelQuantizer's op) against the unfused reference ops."""
import math

import pytest
import torch

import fastvae
from fastvae import reference
from fastvae.ops.gumbel_quantize import gumbel_quantize_with_kl
from helpers import as64, assert_close, randn, requires

OPS = ("gumbel_quantize", "gumbel_quantize_backward")
KL_OPS = ("gumbel_quantize_kl", "gumbel_quantize_kl_backward")
# (rows, K, D): K below, at and off the kernels' 32-column step; one row block and several
SHAPES = [(3, 5, 4), (17, 64, 3), (9, 45, 7)]


def seed_of(generator_seed):
    """The seed tensor fastvae draws from ``torch.Generator().manual_seed(generator_seed)``."""
    return torch.randint(2**63 - 1, (1,), dtype=torch.int64, generator=torch.Generator().manual_seed(generator_seed))


def reference_outputs(logits, codebook, tau, hard, grad, generator_seed):
    """(quantized, indices, grad_logits, grad_codebook, grad_tau) of the float64 reference."""
    x, cb, t, g = as64(logits, codebook, tau, grad)
    seed = seed_of(generator_seed)
    quantized, indices, stats = reference.gumbel_quantize(x, cb, seed, t.reshape(1), hard)
    grads = reference.gumbel_quantize_backward(g, x, cb, seed, t.reshape(1), stats, indices if hard else None)
    return quantized, indices, *grads


def unfused_reference_outputs(logits, codebook, tau, hard, grad, grad_kl, generator_seed):
    """(quantized, indices, kl, grad_logits, grad_codebook, grad_tau) of gumbel_quantize and
    categorical_kl(reduction="none") run apart in the float64 reference, the KL's gradient
    added to the logits'."""
    quantized, indices, grad_logits, grad_codebook, grad_tau = reference_outputs(logits, codebook, tau, hard, grad,
                                                                                 generator_seed)
    x, g_kl = as64(logits, grad_kl)
    kl = reference.categorical_kl(x, None, -1, "none")
    kl_grad = reference.categorical_kl_backward(g_kl, x, None, -1, "none")[0]
    return quantized, indices, kl, grad_logits + kl_grad, grad_codebook, grad_tau


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("shape", SHAPES)
def test_with_kl_matches_the_unfused_reference(backend, shape, hard):
    """Values and gradients (grad of the quantized output and of the rows' KL together)."""
    requires(backend, *KL_OPS)
    n, k, d = shape
    logits = randn(n, k, scale=2.0, requires_grad=True)
    codebook = randn(k, d, requires_grad=True)
    tau = torch.tensor(0.7, requires_grad=True)
    quantized, indices, kl = gumbel_quantize_with_kl(logits, codebook, tau, hard=hard,
                                                     generator=torch.Generator().manual_seed(5))
    grad, grad_kl = randn(n, d), randn(n)
    grads = torch.autograd.grad((quantized, kl), (logits, codebook, tau), (grad, grad_kl))
    expected = unfused_reference_outputs(logits, codebook, tau, hard, grad, grad_kl, 5)
    assert torch.equal(indices, expected[1])
    assert kl.shape == (n,) and kl.dtype == torch.float32
    assert_close(quantized, expected[0], torch.float32, scale=4, msg="quantized")
    assert_close(kl, expected[2], torch.float32, scale=4, msg="kl")
    for name, got, want in zip(("logits", "codebook", "tau"), grads, expected[3:]):
        assert_close(got, want.reshape(got.shape), torch.float32, scale=16, msg=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_with_kl_half_inputs(backend, dtype):
    requires(backend, *KL_OPS)
    logits, codebook = randn(6, 40, dtype=dtype, requires_grad=True), randn(40, 3, dtype=dtype, requires_grad=True)
    quantized, _, kl = gumbel_quantize_with_kl(logits, codebook, 1.3, generator=torch.Generator().manual_seed(2))
    grad, grad_kl = randn(6, 3, dtype=dtype), randn(6)
    grads = torch.autograd.grad((quantized, kl), (logits, codebook), (grad, grad_kl))
    expected = unfused_reference_outputs(logits, codebook, torch.tensor(1.3), False, grad, grad_kl, 2)
    assert quantized.dtype == dtype and kl.dtype == torch.float32 and grads[0].dtype == dtype
    assert_close(quantized, expected[0], dtype, scale=2)
    assert_close(kl, expected[2], dtype)
    assert_close(grads[0], expected[3], dtype, scale=4)
    assert_close(grads[1], expected[4], dtype, scale=4)


def test_with_kl_masked_and_nan_rows(backend):
    """The KL of a partly masked row counts its unmasked codes against the uniform prior over
    all K; an all -inf row has KL 0 and zero gradients, a row with a NaN NaN ones."""
    requires(backend, *KL_OPS)
    logits = randn(4, 40)
    logits[0, :20] = -math.inf
    logits[1] = -math.inf
    logits[2, 7] = math.nan
    logits.requires_grad_()
    codebook = randn(40, 3, requires_grad=True)
    for hard in (False, True):
        quantized, indices, kl = gumbel_quantize_with_kl(logits, codebook, hard=hard,
                                                         generator=torch.Generator().manual_seed(4))
        grad_logits, = torch.autograd.grad((quantized, kl), logits, (randn(4, 3), randn(4)))
        expected = reference.categorical_kl(as64(logits)[0], None, -1, "none")
        assert_close(kl[[0, 3]], expected[[0, 3]], torch.float32)
        assert kl[1] == 0 and kl[2].isnan()
        assert torch.equal(grad_logits[1], torch.zeros(40)) and grad_logits[2].isnan().all()
        assert torch.equal(grad_logits[0, :20], torch.zeros(20)) and torch.isfinite(grad_logits[[0, 3]]).all()


def test_with_kl_several_row_blocks_of_the_native_kernel():
    requires("native", *KL_OPS)
    logits, codebook = randn(300, 65530, scale=2.0, requires_grad=True), randn(65530, 3, requires_grad=True)
    grad, grad_kl = randn(300, 3), randn(300)
    with fastvae.use_backend("native"):
        quantized, indices, kl = gumbel_quantize_with_kl(logits, codebook, 0.9,
                                                         generator=torch.Generator().manual_seed(9))
        grads = torch.autograd.grad((quantized, kl), (logits, codebook), (grad, grad_kl))
    expected = unfused_reference_outputs(logits, codebook, torch.tensor(0.9), False, grad, grad_kl, 9)
    assert torch.equal(indices, expected[1])
    assert_close(quantized, expected[0], torch.float32, scale=4)
    assert_close(kl, expected[2], torch.float32, scale=16)
    assert_close(grads[0], expected[3], torch.float32, scale=16)
    assert_close(grads[1], expected[4], torch.float32, scale=64)


def test_with_kl_reference_gradcheck_and_double_backward():
    logits = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    with fastvae.use_backend("torch"):
        def quantize_and_kl(x, cb, t):
            return gumbel_quantize_with_kl(x, cb, t, generator=torch.Generator().manual_seed(3))[::2]

        assert torch.autograd.gradcheck(quantize_and_kl, (logits, codebook, tau))
        assert torch.autograd.gradgradcheck(quantize_and_kl, (logits, codebook, tau))


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_reference_with_gradients(backend, shape, hard):
    requires(backend, *OPS)
    n, k, d = shape
    logits = randn(n, k, scale=2.0, requires_grad=True)
    codebook = randn(k, d, requires_grad=True)
    tau = torch.tensor(0.7, requires_grad=True)
    quantized, indices = fastvae.gumbel_quantize(logits, codebook, tau, hard=hard, dim=-1,
                                                 generator=torch.Generator().manual_seed(5))
    grad = randn(n, d)
    grads = torch.autograd.grad(quantized, (logits, codebook, tau), grad)
    expected = reference_outputs(logits, codebook, tau, hard, grad, 5)
    assert torch.equal(indices, expected[1])
    assert_close(quantized, expected[0], torch.float32, scale=4, msg="quantized")
    for name, got, want in zip(("logits", "codebook", "tau"), grads, expected[2:]):
        assert_close(got, want.reshape(got.shape), torch.float32, scale=16, msg=f"grad {name}")


def test_several_row_blocks_of_the_native_kernel():
    """The native kernel works in blocks of 64 MiB of float32 sample (256 rows at K = 65530):
    rows in later blocks keep their own noise, statistics and gradients."""
    requires("native", *OPS)
    logits, codebook = randn(300, 65530, scale=2.0, requires_grad=True), randn(65530, 3, requires_grad=True)
    grad = randn(300, 3)
    with fastvae.use_backend("native"):
        for hard in (False, True):
            quantized, indices = fastvae.gumbel_quantize(logits, codebook, 0.9, hard=hard, dim=-1,
                                                         generator=torch.Generator().manual_seed(9))
            grads = torch.autograd.grad(quantized, (logits, codebook), grad)
            expected = reference_outputs(logits, codebook, torch.tensor(0.9), hard, grad, 9)
            assert torch.equal(indices, expected[1])
            assert_close(quantized, expected[0], torch.float32, scale=4)
            assert_close(grads[0], expected[2], torch.float32, scale=16)
            assert_close(grads[1], expected[3], torch.float32, scale=64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype):
    requires(backend, *OPS)
    logits, codebook = randn(6, 40, dtype=dtype, requires_grad=True), randn(40, 3, dtype=dtype, requires_grad=True)
    quantized, indices = fastvae.gumbel_quantize(logits, codebook, 1.3, dim=-1,
                                                 generator=torch.Generator().manual_seed(2))
    grad = randn(6, 3, dtype=dtype)
    grads = torch.autograd.grad(quantized, (logits, codebook), grad)
    expected = reference_outputs(logits, codebook, torch.tensor(1.3), False, grad, 2)
    assert quantized.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
    assert_close(quantized, expected[0], dtype, scale=2)
    assert_close(grads[0], expected[2], dtype, scale=4)
    assert_close(grads[1], expected[3], dtype, scale=4)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_same_noise_as_gumbel_softmax(backend, hard):
    """With the identity codebook the op's output is gumbel_softmax's sample for the same seed."""
    requires(backend, *OPS, "gumbel_softmax")
    logits = randn(2, 33, 3, scale=3.0)
    quantized, indices = fastvae.gumbel_quantize(logits, torch.eye(33), 0.5, hard=hard, dim=1,
                                                 generator=torch.Generator().manual_seed(11))
    sample = fastvae.gumbel_softmax(logits, 0.5, hard=hard, dim=1, generator=torch.Generator().manual_seed(11))
    assert_close(quantized, sample, torch.float32)
    assert torch.equal(indices, sample.argmax(dim=1))


def test_dim_and_layout_as_taming_einsum(backend):
    requires(backend, *OPS, "gumbel_softmax")
    logits = randn(2, 37, 3, 4).transpose(2, 3)  # (B, K, W, H), not contiguous
    codebook = randn(37, 5)
    quantized, indices = fastvae.gumbel_quantize(logits, codebook, generator=torch.Generator().manual_seed(1))
    sample = fastvae.gumbel_softmax(logits, dim=1, generator=torch.Generator().manual_seed(1))
    assert quantized.shape == (2, 5, 4, 3) and indices.shape == (2, 4, 3)
    assert_close(quantized, torch.einsum("b n h w, n d -> b d h w", sample, codebook), torch.float32, scale=2)


def test_hard_is_the_code_at_the_argmax(backend):
    requires(backend, *OPS)
    logits, codebook = randn(20, 50), randn(50, 6)
    quantized, indices = fastvae.gumbel_quantize(logits, codebook, hard=True, dim=-1)
    assert torch.equal(quantized, codebook[indices])


def test_masked_and_nan_rows(backend):
    """-inf logits are never drawn; an all -inf row gives zeros, a row with a NaN NaN."""
    requires(backend, *OPS)
    logits = randn(4, 40)
    logits[0, :20] = -math.inf
    logits[1] = -math.inf
    logits[2, 7] = math.nan
    codebook = randn(40, 3)
    for hard in (False, True):
        quantized, indices = fastvae.gumbel_quantize(logits, codebook, hard=hard, dim=-1,
                                                     generator=torch.Generator().manual_seed(4))
        assert indices[0] >= 20
        assert torch.equal(quantized[1], torch.zeros(3)) and quantized[2].isnan().all()
        assert torch.isfinite(quantized[[0, 3]]).all()


def test_reference_gradcheck_and_double_backward():
    logits = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    with fastvae.use_backend("torch"):
        def quantize(x, cb, t, hard=False):
            return fastvae.gumbel_quantize(x, cb, t, hard=hard, generator=torch.Generator().manual_seed(3))[0]

        assert torch.autograd.gradcheck(quantize, (logits, codebook, tau))
        assert torch.autograd.gradgradcheck(quantize, (logits, codebook, tau))
        # hard's value is piecewise constant in the logits (its gradient there is the
        # straight-through one, checked against gumbel_softmax below); in the codebook it is exact
        assert torch.autograd.gradcheck(lambda cb: quantize(logits.detach(), cb, tau.detach(), True), (codebook,))


def test_gradients_match_gumbel_softmax_then_matmul():
    """The spec's gradients (tau's included, soft and straight-through) are autograd's of
    the textbook composition gumbel_softmax(...) @ codebook."""
    logits = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 4, dtype=torch.float64)
    with fastvae.use_backend("torch"):
        for hard in (False, True):
            fused = fastvae.gumbel_quantize(logits, codebook, tau, hard=hard, dim=-1,
                                            generator=torch.Generator().manual_seed(8))[0]
            sample = fastvae.gumbel_softmax(logits, tau, hard=hard, generator=torch.Generator().manual_seed(8))
            for got, want in zip(torch.autograd.grad(fused, (logits, codebook, tau), grad),
                                 torch.autograd.grad(sample @ codebook, (logits, codebook, tau), grad)):
                torch.testing.assert_close(got, want)


def test_bad_input_raises_clearly():
    logits, codebook = randn(4, 8), randn(8, 3)
    with pytest.raises(ValueError, match="codebook must be"):
        fastvae.gumbel_quantize(logits, randn(7, 3), dim=-1)
    with pytest.raises(ValueError, match="codebook must be"):
        fastvae.gumbel_quantize(logits, randn(8), dim=-1)
    with pytest.raises(TypeError, match="codebook"):
        fastvae.gumbel_quantize(logits, codebook.long(), dim=-1)
    with pytest.raises(TypeError, match="logits"):
        fastvae.gumbel_quantize(logits.long(), codebook, dim=-1)
    with pytest.raises(ValueError, match="tau"):
        fastvae.gumbel_quantize(logits, codebook, tau=0.0, dim=-1)
    with pytest.raises(ValueError, match="dim"):
        fastvae.gumbel_quantize(logits, codebook, dim=2)
    with pytest.raises(ValueError, match="codebook is on meta"):
        fastvae.gumbel_quantize(logits, codebook.to("meta"), dim=-1)


def test_fake_tensors():
    """Shapes under fake tensors, also after a real call cached its tau tensor (which fake
    mode then rejected as a real input)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    fastvae.gumbel_quantize(randn(2, 16), randn(16, 5), 1.0, dim=-1)
    with FakeTensorMode():
        quantized, indices = fastvae.gumbel_quantize(torch.empty(2, 16, 3, 3), torch.empty(16, 5))
    assert quantized.shape == (2, 5, 3, 3) and indices.shape == (2, 3, 3) and indices.dtype == torch.int64


def test_quantizer_loads_a_taming_checkpoint():
    """taming's GumbelQuantize keeps proj as a 1x1 Conv2d: its (K, C, 1, 1) weight loads."""
    layer = fastvae.nn.GumbelQuantizer(6, 11, 4)
    conv = torch.nn.Conv2d(6, 11, 1)
    taming_state = {"proj.weight": conv.weight.detach(), "proj.bias": conv.bias.detach(),
                    "embed.weight": torch.randn(11, 4)}
    layer.load_state_dict(taming_state)
    x = torch.randn(2, 6, 3, 3)
    layer.eval()
    torch.testing.assert_close(layer.proj(x.movedim(1, -1)).movedim(-1, 1), conv(x))
    assert torch.equal(layer.embed.weight, taming_state["embed.weight"])
    prefixed = fastvae.nn.GumbelQuantizer(6, 11, 4)
    holder = torch.nn.Module()
    holder.quantize = prefixed
    holder.load_state_dict({f"quantize.{key}": value for key, value in taming_state.items()})
    assert torch.equal(prefixed.proj.weight, conv.weight.detach().flatten(1))


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_opcheck(backend, hard):
    """Schemas and fake implementations as torch.compile / AOTAutograd see them."""
    requires(backend, *OPS)
    logits, codebook, seed, tau = randn(5, 33), randn(33, 4), torch.tensor([77]), torch.tensor([0.5])
    torch.library.opcheck(torch.ops.fastvae.gumbel_quantize.default, (logits, codebook, seed, tau, hard))
    _, indices, stats = torch.ops.fastvae.gumbel_quantize.default(logits, codebook, seed, tau, hard)
    torch.library.opcheck(torch.ops.fastvae.gumbel_quantize_backward.default,
                          (randn(5, 4), logits, codebook, seed, tau, stats, indices if hard else None))


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_with_kl_opcheck(backend, hard):
    requires(backend, *KL_OPS)
    logits, codebook, seed, tau = randn(5, 33), randn(33, 4), torch.tensor([77]), torch.tensor([0.5])
    torch.library.opcheck(torch.ops.fastvae.gumbel_quantize_kl.default, (logits, codebook, seed, tau, hard))
    _, indices, stats, kl = torch.ops.fastvae.gumbel_quantize_kl.default(logits, codebook, seed, tau, hard)
    torch.library.opcheck(torch.ops.fastvae.gumbel_quantize_kl_backward.default,
                          (randn(5, 4), randn(5), logits, codebook, seed, tau, stats, kl, indices if hard else None))


def test_with_kl_compiled_fullgraph_matches_eager(backend):
    requires(backend, *KL_OPS)

    def quantize_loss(logits, codebook, tau):
        quantized, _, kl = gumbel_quantize_with_kl(logits, codebook, tau)
        return quantized.square().sum() + kl.mean()

    inputs = (randn(6, 9), randn(9, 4), torch.tensor(0.8))
    results = []
    torch._dynamo.reset()
    for runner in (quantize_loss, torch.compile(quantize_loss, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        torch.manual_seed(123)
        loss = runner(*leaves)
        results.append([loss, *torch.autograd.grad(loss, leaves)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compiled_fullgraph_matches_eager(backend):
    requires(backend, *OPS)

    def quantize_loss(logits, codebook, tau):
        quantized, _ = fastvae.gumbel_quantize(logits, codebook, tau, dim=1)
        return quantized.square().sum()

    inputs = (randn(2, 9, 3), randn(9, 4), torch.tensor(0.8))
    results = []
    torch._dynamo.reset()
    for runner in (quantize_loss, torch.compile(quantize_loss, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        torch.manual_seed(123)  # aot_eager draws the seed as eager does
        loss = runner(*leaves)
        results.append([loss, *torch.autograd.grad(loss, leaves)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
