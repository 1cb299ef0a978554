"""The native backend's C++ per-call path (csrc/eager.cpp, taken by plain eager CPU calls)
against the Python path it stands in for: same outputs, gradients, second derivatives
and random stream, and the calls it does not take still go the Python way."""
import numpy as np
import pytest
import torch

import fastvae
from fastvae.ops import _common

from helpers import randn

pytestmark = pytest.mark.skipif("native" not in fastvae.available_backends(), reason="needs the native backend")


def _vq(estimator):
    def call(x, codebook, generator):
        quantized, indices, loss = fastvae.vector_quantize(x.reshape(2, 3, -1), codebook, beta=0.5, estimator=estimator)
        return quantized, indices.float(), loss

    return call


def _tau(t):
    return t.abs() + 0.5  # a learned temperature, positive, with its own autograd history


CALLS = {  # case -> (the op, inputs' shapes, call(first, second, generator) -> outputs)
    "reparameterize": ("reparameterize", [(6, 5), (6, 5)],
                       lambda mu, lv, g: (fastvae.reparameterize(mu, lv, generator=g),)),
    "gaussian_kl": ("gaussian_kl", [(6, 5), (6, 5)], lambda mu, lv, g: (fastvae.gaussian_kl(mu, lv, reduction="sum"),)),
    "gaussian_kl_per_sample": ("gaussian_kl", [(6, 2, 3), (6, 2, 3)],
                               lambda mu, lv, g: (fastvae.gaussian_kl(mu, lv, reduction="per_sample"),)),
    "reparameterize_kl": ("reparameterize_kl", [(6, 5), (6, 5)],
                          lambda mu, lv, g: fastvae.reparameterize_kl(mu, lv, reduction="mean", generator=g)),
    "reparameterize_kl_per_sample": ("reparameterize_kl", [(6, 5), (6, 5)],
                                     lambda mu, lv, g: fastvae.reparameterize_kl(mu, lv, reduction="per_sample",
                                                                                 generator=g)),
    "gumbel_softmax": ("gumbel_softmax", [(6, 5)],
                       lambda logits, _, g: (fastvae.gumbel_softmax(logits, 0.7, dim=0, generator=g),)),
    "gumbel_softmax_hard": ("gumbel_softmax", [(6, 5)],
                            lambda logits, _, g: (fastvae.gumbel_softmax(logits, 2, True, generator=g),)),
    "gumbel_softmax_tensor_tau": ("gumbel_softmax", [(6, 5), ()],
                                  lambda logits, tau, g: (fastvae.gumbel_softmax(logits, _tau(tau), generator=g),)),
    "gumbel_softmax_hard_tensor_tau": ("gumbel_softmax", [(6, 5), (1,)],
                                       lambda logits, tau, g: (fastvae.gumbel_softmax(logits, _tau(tau), True, dim=0,
                                                                                      generator=g),)),
    "vector_quantize": ("vector_quantize", [(6, 4), (7, 4)], _vq("ste")),
    "vector_quantize_rotation": ("vector_quantize", [(6, 4), (7, 4)], _vq("rotation")),
}


def _run(op, inputs, generator_seed, create_graph):
    """Outputs, gradients and second derivatives of ``op``, and the generator state after."""
    _, shapes, call = CALLS[op]
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
    name = CALLS[op][0]
    inputs = [randn(*shape, dtype=dtype) for shape in CALLS[op][1]]
    assert _common.native_eager(name, inputs[0]) is not None, "a plain eager CPU call may take the C++ path"
    entry = _common._eager_entries[name]
    results = []

    def recorded(*args):
        results.append(entry(*args))
        return results[-1]

    monkeypatch.setitem(_common._eager_entries, name, recorded)
    cpp = _run(op, inputs, generator_seed, create_graph)
    assert results and all(r is not None for r in results), "the C++ path took the call"
    monkeypatch.setattr(_common, "_eager_entries", {})  # the Python path only
    python = _run(op, inputs, generator_seed, create_graph)
    for got, want in zip(cpp[:3], python[:3]):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert torch.equal(cpp[3], python[3]), "the seed is drawn from the same generator, once"


def _screened_out(op, *args):
    """Whether the C++ entry point of ``op`` leaves this call to the Python path."""
    entry = _common.native_eager(op, args[0])
    return entry is not None and entry(*args) is None


def test_calls_the_cpp_path_does_not_take_go_the_python_way():
    x = randn(4, 3)
    assert _screened_out("reparameterize", x.double(), x.double(), None)  # no native kernel: torch backend
    assert _common.native_eager("reparameterize", torch.nn.Parameter(x)) is not None
    with fastvae.use_backend("torch"):
        assert _common.native_eager("reparameterize", x) is None
    assert _screened_out("reparameterize", x, x[:2], None) and _screened_out("reparameterize", x, x.half(), None)
    with pytest.raises(ValueError, match="logvar has shape"):
        fastvae.reparameterize(x, x[:2])
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        fastvae.reparameterize(x, x, generator=3)
    with pytest.raises(ValueError, match="prior_mu of shape"):
        fastvae.gaussian_kl(x, x, prior_mu=randn(5))
    assert _screened_out("gaussian_kl", x[0, 0], x[0, 0], None, None, "per_sample")
    with pytest.raises(ValueError, match="reduction='per_sample' sums over every dimension but the first"):
        fastvae.gaussian_kl(x[0, 0], x[0, 0], reduction="per_sample")
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        fastvae.gumbel_softmax(x, tau=float("inf"))
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        fastvae.gumbel_softmax(x, dim=2)
    assert _screened_out("gumbel_softmax", x[:, :0], 1.0, False, -1, None)
    with pytest.raises(ValueError, match="logits has no classes"):
        fastvae.gumbel_softmax(x[:, :0])
    for tau, error, match in [(torch.tensor([1, 2]), TypeError, "tau must be a number or a floating-point tensor"),
                              (torch.ones(2), ValueError, "tau as a tensor must have one element"),
                              (torch.ones(1, device="meta"), ValueError, "tau is on meta but logits is on cpu")]:
        assert _screened_out("gumbel_softmax", x, tau, False, -1, None)
        with pytest.raises(error, match=match):
            fastvae.gumbel_softmax(x, tau)
    with pytest.raises(TypeError, match="beta must be a real number, got bool"):
        fastvae.vector_quantize(x, x, beta=True)
    for beta in (-1.0, float("inf")):
        assert _screened_out("vector_quantize", x, x, beta, "ste")
        with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
            fastvae.vector_quantize(x, x, beta=beta)
    assert _screened_out("vector_quantize", x, x, 0.25, "straight")
    with pytest.raises(ValueError, match="estimator must be one of 'ste', 'rotation', got 'straight'"):
        fastvae.vector_quantize(x, x, estimator="straight")
    assert _screened_out("vector_quantize", x[:, :0], x[:, :0], 0.25, "ste")
    with pytest.raises(ValueError, match="x and codebook have 0 features"):
        fastvae.vector_quantize(x[:, :0], x[:, :0])
    with torch.inference_mode():  # inference tensors: no autograd node, same values
        torch.manual_seed(0)
        z = fastvae.reparameterize(x, x)
    torch.manual_seed(0)
    assert torch.equal(z, fastvae.reparameterize(x, x)) and z.grad_fn is None


def test_numpy_arguments_and_modes_take_the_python_path_with_the_same_stream():
    """What the C++ path leaves to Python (NumPy scalars, a torch function mode) gives the
    values the C++ path gives for the same seed."""
    logits, x, codebook = randn(5, 4), randn(6, 3), randn(4, 3)
    assert _screened_out("gumbel_softmax", logits, np.float32(0.5), np.True_, -1, None)
    torch.manual_seed(3)
    want = fastvae.gumbel_softmax(logits, 0.5, True), fastvae.vector_quantize(x, codebook, beta=0.5)[2]
    torch.manual_seed(3)
    got = fastvae.gumbel_softmax(logits, np.float32(0.5), np.True_), fastvae.vector_quantize(x, codebook,
                                                                                              beta=np.float64(0.5))[2]
    assert all(torch.equal(g, w) for g, w in zip(got, want))

    class Seen(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Seen():
        assert _screened_out("gumbel_softmax", logits, 0.5, True, -1, None)
        torch.manual_seed(3)
        assert torch.equal(fastvae.gumbel_softmax(logits, 0.5, True), want[0])


def test_export_takes_the_python_path():
    """torch.export traces the custom ops (the C++ path would be opaque to it): the exported
    program holds fastvae ops and computes what eager does."""
    class Loss(torch.nn.Module):
        def forward(self, mu, logvar, logits):
            return fastvae.gaussian_kl(mu, logvar, reduction="per_sample"), fastvae.gumbel_softmax(logits, 0.5)

    args = randn(4, 3), randn(4, 3), randn(4, 5)
    program = torch.export.export(Loss(), args)
    assert {"fastvae.gaussian_kl.default", "fastvae.gumbel_softmax.default"} <= {
        str(node.target) for node in program.graph.nodes}
    kl, y = program.module()(*args)
    torch.testing.assert_close(kl, fastvae.gaussian_kl(args[0], args[1], reduction="per_sample"))
    assert y.shape == args[2].shape
