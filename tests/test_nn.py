"""fastvae.nn: the layers equal their functional ops and behave as layers."""
import pytest
import torch

import fastvae
import fastvae.nn as fnn
from helpers import requires


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
