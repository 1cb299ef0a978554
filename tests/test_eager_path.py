"""The native backend's C++ per-call path (csrc/eager.cpp, taken by plain eager CPU calls)
against the Python path it stands in for: same outputs, gradients, second derivatives
and random stream, and the calls it does not take still go the Python way."""
import pytest
import torch

import fastvae
from fastvae.ops import _common

from helpers import randn

pytestmark = pytest.mark.skipif("native" not in fastvae.available_backends(), reason="needs the native backend")


def _vq(x, codebook, generator):
    quantized, indices, loss = fastvae.vector_quantize(x.reshape(2, 3, -1), codebook, beta=0.5)
    return quantized, indices.float(), loss


CALLS = {  # op -> (inputs' shapes, call(first, second, generator) -> outputs)
    "reparameterize": ([(6, 5), (6, 5)], lambda mu, lv, g: (fastvae.reparameterize(mu, lv, generator=g),)),
    "gaussian_kl": ([(6, 5), (6, 5)], lambda mu, lv, g: (fastvae.gaussian_kl(mu, lv, reduction="sum"),)),
    "reparameterize_kl": ([(6, 5), (6, 5)],
                          lambda mu, lv, g: fastvae.reparameterize_kl(mu, lv, reduction="mean", generator=g)),
    "gumbel_softmax": ([(6, 5)], lambda logits, _, g: (fastvae.gumbel_softmax(logits, 0.7, dim=0, generator=g),)),
    "gumbel_softmax_hard": ([(6, 5)], lambda logits, _, g: (fastvae.gumbel_softmax(logits, 2, True, generator=g),)),
    "vector_quantize": ([(6, 4), (7, 4)], _vq),
}


def _run(op, inputs, generator_seed, create_graph):
    """Outputs, gradients and second derivatives of ``op``, and the generator state after."""
    shapes, call = CALLS[op]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    torch.manual_seed(1)
    outputs = call(*leaves, *([None] * (2 - len(leaves))), generator)
    weights = [torch.linspace(-1, 2, o.numel()).reshape(o.shape).to(o.dtype) for o in outputs]
    loss = sum((o * w).sum() for o, w in zip(outputs, weights) if o.requires_grad)
    grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True)
    seconds = []
    if create_graph:
        used = [g for g in grads if g is not None and g.requires_grad]
        if used:
            seconds = torch.autograd.grad(sum((g * g).sum() for g in used), leaves, allow_unused=True)
    state = (generator or torch.default_generator).get_state()
    return [o.detach() for o in outputs], grads, seconds, state


@pytest.mark.parametrize("create_graph", [False, True], ids=["grad", "double-backward"])
@pytest.mark.parametrize("generator_seed", [None, 5], ids=["default-generator", "generator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", CALLS)
def test_cpp_path_matches_python_path(op, dtype, generator_seed, create_graph, monkeypatch):
    inputs = [randn(*shape, dtype=dtype) for shape in CALLS[op][0]]
    first = _common.native_eager(op.replace("_hard", ""), inputs[0])
    assert first is not None, "a plain eager CPU call takes the C++ path"
    cpp = _run(op, inputs, generator_seed, create_graph)
    monkeypatch.setattr(_common, "_eager_entries", {})  # the Python path only
    python = _run(op, inputs, generator_seed, create_graph)
    for got, want in zip(cpp[:3], python[:3]):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert torch.equal(cpp[3], python[3]), "the seed is drawn from the same generator, once"


def test_calls_the_cpp_path_does_not_take_go_the_python_way():
    x = randn(4, 3)
    assert _common.native_eager("reparameterize", x.double()) is None  # no native kernel: torch backend
    assert _common.native_eager("reparameterize", torch.nn.Parameter(x)) is not None
    with fastvae.use_backend("torch"):
        assert _common.native_eager("reparameterize", x) is None
    entry = _common.native_eager("reparameterize", x)
    assert entry(x, x[:2], None) is None and entry(x, x.half(), None) is None  # screened out: Python raises
    with pytest.raises(ValueError, match="logvar has shape"):
        fastvae.reparameterize(x, x[:2])
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        fastvae.reparameterize(x, x, generator=3)
    with pytest.raises(ValueError, match="prior_mu of shape"):
        fastvae.gaussian_kl(x, x, prior_mu=randn(5))
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        fastvae.gumbel_softmax(x, tau=float("inf"))
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        fastvae.gumbel_softmax(x, dim=2)
    with pytest.raises(TypeError, match="beta must be a real number, got bool"):
        fastvae.vector_quantize(x, x, beta=True)
    with torch.inference_mode():  # inference tensors: no autograd node, same values
        torch.manual_seed(0)
        z = fastvae.reparameterize(x, x)
    torch.manual_seed(0)
    assert torch.equal(z, fastvae.reparameterize(x, x)) and z.grad_fn is None
