"""fastvae.nn: the layers equal their functional ops and behave as layers."""
import numpy as np
import pytest
import torch

import fastvae
import fastvae.nn as fnn
from fastvae import reference
from helpers import as64, assert_close, requires, requires_on


def test_reparameterize_layer(backend):
    requires(backend, "reparameterize")
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4)
    layer = fnn.Reparameterize(sample_in_eval=False)
    torch.manual_seed(5)
    z = layer(mu, logvar)
    torch.manual_seed(5)
    assert torch.equal(z, fastvae.reparameterize(mu, logvar))
    assert torch.equal(layer.eval()(mu, logvar), mu)
    assert "sample_in_eval=False" in repr(layer)


def test_gaussian_kl_layer_with_beta(backend):
    requires(backend, "gaussian_kl")
    mu, logvar, prior = torch.randn(3, 4), torch.randn(3, 4), torch.randn(4)
    layer = fnn.GaussianKL(reduction="sum", beta=4.0)
    torch.testing.assert_close(layer(mu, logvar, prior), 4.0 * fastvae.gaussian_kl(mu, logvar, prior,
                                                                                     reduction="sum"))
    assert "beta=4.0" in repr(layer)
    with pytest.raises(ValueError, match="reduction"):
        fnn.GaussianKL(reduction="avg")


def test_gumbel_softmax_layer(backend):
    requires(backend, "gumbel_softmax")
    logits = torch.randn(2, 5, 3)
    layer = fnn.GumbelSoftmax(tau=0.5, hard=True, dim=1)
    torch.manual_seed(9)
    y = layer(logits)
    torch.manual_seed(9)
    assert torch.equal(y, fastvae.gumbel_softmax(logits, 0.5, True, dim=1))
    assert torch.equal(y.sum(1), torch.ones(2, 3))
    assert repr(layer) == "GumbelSoftmax(tau=0.5, hard=True, dim=1)"


@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_vector_quantizer_layouts(channel_dim, backend):
    requires(backend, "vector_quantize", "vector_quantize_backward")
    vq = fnn.VectorQuantizer(num_codes=10, dim=6, beta=0.5, channel_dim=channel_dim)
    shape = (2, 4, 3, 6) if channel_dim == -1 else (2, 6, 4, 3)
    x = torch.randn(shape, requires_grad=True)
    quantized, indices, loss = vq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 4, 3) and loss.dim() == 0
    channel_last = x if channel_dim == -1 else x.movedim(1, -1)
    expected = fastvae.vector_quantize(channel_last, vq.codebook, beta=0.5)
    assert torch.equal(indices, expected[1])
    q_last = quantized if channel_dim == -1 else quantized.movedim(1, -1)
    torch.testing.assert_close(q_last, vq.codebook[indices])
    (quantized.sum() + loss).backward()
    assert x.grad is not None and vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0


def test_vector_quantizer_trains_toward_the_data():
    torch.manual_seed(0)
    data = torch.randn(512, 4) * 0.1 + torch.tensor([3.0, -2.0, 1.0, 0.5])
    vq = fnn.VectorQuantizer(num_codes=8, dim=4)
    optimizer = torch.optim.SGD(vq.parameters(), lr=2.0)
    first = None
    for _ in range(100):
        _, _, loss = vq(data)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_vector_quantizer_restarts_dead_codes_from_the_input(ema_decay):
    torch.manual_seed(0)
    x = torch.randn(64, 3, requires_grad=True)
    vq = fnn.VectorQuantizer(8, 3, ema_decay=ema_decay, dead_code_threshold=0.5)
    with torch.no_grad():
        vq.codebook[4:] = 1e3  # never chosen
        vq.ema_count[4:] = 0.1  # their running usage has decayed below the threshold
    before = vq.codebook.detach().clone()
    vq.eval()(x)
    assert torch.equal(vq.codebook, before), "eval calls must not restart codes"
    quantized, indices, loss = vq.train()(x)
    (quantized.sum() + loss).backward()  # the restart happened before the search: autograd is intact
    restarted = vq.codebook.detach()[4:]
    distance_to_input = torch.cdist(restarted, x.detach()).min(dim=1).values
    if ema_decay is None:
        assert torch.equal(distance_to_input, torch.zeros(4)), "dead codes become vectors of the input"
        assert torch.equal(vq.codebook[:4], before[:4])
        torch.testing.assert_close(vq.ema_count[4:], 0.5 * 0.99 + 0.01 * vq.usage_count[4:].float())
    else:  # then the EMA step moves them toward the inputs they won, away from 1e3
        assert (distance_to_input < 5).all()
    assert "dead_code_threshold=0.5" in repr(vq)


def test_vector_quantizer_dead_code_restart_is_off_by_default_and_checked():
    vq = fnn.VectorQuantizer(8, 3)
    assert not hasattr(vq, "ema_count") and "dead_code" not in repr(vq)
    with pytest.raises(ValueError, match="dead_code_threshold"):
        fnn.VectorQuantizer(8, 3, dead_code_threshold=-1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dead_code_threshold", [0.0, 0.5])
def test_ema_vector_quantizer_in_another_module_dtype(dtype, dead_code_threshold, backend):
    """After .double()/.half()/.bfloat16() the EMA statistics stay at least float32 and the
    update writes the codebook in the module's dtype: the VQ-VAE EMA formulas in float64."""
    requires_on(backend, "cpu", "vector_quantize", dtype=dtype)
    vq = fnn.VectorQuantizer(6, 3, ema_decay=0.8, ema_eps=0.1, dead_code_threshold=dead_code_threshold).to(dtype)
    assert vq.codebook.dtype == dtype
    assert vq.ema_sum.dtype == vq.ema_count.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(40, 3).to(dtype)
    ema_sum, ema_count = (t.double().clone() for t in (vq.ema_sum, vq.ema_count))  # the update writes in place
    _, indices, _ = vq.eval()(x)
    assert torch.equal(vq.ema_count, ema_count.to(vq.ema_count.dtype)), "eval calls must not update"
    _, indices, _ = vq.train()(x)
    counts = torch.bincount(indices, minlength=6).double()
    ema_count = 0.8 * ema_count + 0.2 * counts
    ema_sum = 0.8 * ema_sum + 0.2 * torch.zeros(6, 3, dtype=torch.float64).index_add_(0, indices, x.double())
    smoothed = (ema_count + 0.1) / (ema_count.sum() + 6 * 0.1) * ema_count.sum()
    assert_close(vq.codebook, ema_sum / smoothed[:, None], dtype)
    assert_close(vq.ema_count, ema_count, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dead_codes_restart_in_another_module_dtype(dtype, backend):
    requires_on(backend, "cpu", "vector_quantize", "vector_quantize_backward", dtype=dtype)
    vq = fnn.VectorQuantizer(6, 3, dead_code_threshold=0.5).to(dtype)
    with torch.no_grad():
        vq.ema_count[4:] = 0.1
    x = torch.randn(40, 3).to(dtype).requires_grad_()
    quantized, _, loss = vq(x)
    (quantized.sum() + loss).backward()
    assert vq.codebook.grad.dtype == dtype and vq.ema_count.dtype != torch.float16
    distance_to_input = torch.cdist(vq.codebook.detach()[4:].double(), x.detach().double()).min(dim=1).values
    assert torch.equal(distance_to_input, torch.zeros(2, dtype=torch.float64)), "dead codes become rows of x"


def test_two_training_calls_with_dead_code_restarts_then_one_backward(backend):
    """A restart between two calls must neither break the first call's pending backward nor
    change the codebook values it differentiates: each call's gradients are those of the
    codebook it searched (the float64 reference), summed into the parameter."""
    requires(backend, "vector_quantize", "vector_quantize_backward")
    vq = fnn.VectorQuantizer(6, 3, beta=0.5, dead_code_threshold=0.5)
    xs = [torch.randn(8, 3, requires_grad=True) for _ in range(2)]
    version = vq.codebook._version
    outputs, codebooks = [], []
    for x, dead in zip(xs, [[], [0, 5]]):
        with torch.no_grad():
            vq.ema_count[dead] = 0.1  # fallen below the threshold: this call restarts them
        outputs.append(vq(x))
        codebooks.append(vq.codebook.detach().clone())
    assert not torch.equal(codebooks[0][[0, 5]], codebooks[1][[0, 5]]), "the second call restarts codes 0 and 5"
    assert torch.equal(codebooks[0][1:5], codebooks[1][1:5])
    assert vq.codebook._version == version, "restarts must not count as in-place writes of the parameter"
    sum(quantized.sum() + loss for quantized, _, loss in outputs).backward()
    expected_codebook_grad = torch.zeros(6, 3, dtype=torch.float64)
    for x, codebook, (quantized, indices, _) in zip(xs, codebooks, outputs):
        grad_x, grad_codebook = reference.vector_quantize_backward(
            torch.ones(8, 3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), *as64(x, codebook),
            indices, 0.5)
        assert_close(x.grad, grad_x, torch.float32)
        assert_close(quantized, codebook[indices], torch.float32)
        expected_codebook_grad += grad_codebook
    assert_close(vq.codebook.grad, expected_codebook_grad, torch.float32)


def test_vector_quantizer_checks_its_arguments():
    for kwargs, error, message in [
            (dict(dim=2.5), TypeError, "dim must be an int, got float"),
            (dict(num_codes=True), TypeError, "num_codes must be an int, got bool"),
            (dict(num_codes=0), ValueError, "num_codes must be >= 1"),
            (dict(beta=-1.0), ValueError, "beta must be a finite number >= 0"),
            (dict(beta=float("nan")), ValueError, "beta must be a finite number >= 0"),
            (dict(beta=float("inf")), ValueError, "beta must be a finite number >= 0"),
            (dict(beta="0.25"), TypeError, "beta must be a real number"),
            (dict(ema_decay=0.9, ema_eps=-1e-5), ValueError, "ema_eps must be a finite number > 0"),
            (dict(ema_decay=0.9, ema_eps=0.0), ValueError, "ema_eps must be a finite number > 0")]:
        with pytest.raises(error, match=message):
            fnn.VectorQuantizer(**{"num_codes": 8, "dim": 3, **kwargs})
    vq = fnn.VectorQuantizer(np.int64(8), np.int32(3), beta=np.float32(0.5))  # as PyTorch takes numbers
    assert (vq.num_codes, vq.dim, vq.beta) == (8, 3, 0.5) and type(vq.beta) is float


def test_vector_quantizer_rejects_a_bad_input_before_any_restart():
    vq = fnn.VectorQuantizer(8, 3, dead_code_threshold=0.5)
    with torch.no_grad():
        vq.ema_count[4:] = 0.1  # a training call would restart these
    state = {name: t.clone() for name, t in vq.state_dict().items()}
    x = torch.randn(4, 6)  # 6 features reshape into rows of 3: nothing but a check stops the restart
    rng_state = torch.get_rng_state()
    for bad, error, message in [(x, ValueError, "x has 6 features along channel_dim=-1 but the quantizer's dim is 3"),
                                (x[:, :3].long(), TypeError, "x must be a float"),
                                (torch.tensor(1.0), ValueError, "channel_dim=-1 is out of range")]:
        with pytest.raises(error, match=message):
            vq(bad)
    assert torch.equal(torch.get_rng_state(), rng_state)
    for name, before in state.items():
        assert torch.equal(vq.state_dict()[name], before), f"{name} was written"
