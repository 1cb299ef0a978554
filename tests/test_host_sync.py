"""No host sync and nothing that breaks CUDA-graph capture on the hot path (issue 14, item 6).

On CUDA, ``.item()``, ``.cpu()``, ``.nonzero()`` and ``torch.bincount`` wait for the GPU
(and are illegal under ``torch.cuda.graph`` capture). Here they are patched to raise while
every public op (forward and backward) and every module's training step runs, so the rule
is checked on CPU, on each kernel backend (the ``torch`` backend is the spec, not the hot
path: its exact VQ rescan uses ``nonzero``)."""
import contextlib

import pytest
import torch

import fastvae
import fastvae.nn
from conftest import BACKENDS
from helpers import requires

KERNEL_BACKENDS = [name for name in BACKENDS if name != "torch"]
SYNCS = [(torch.Tensor, "item"), (torch.Tensor, "cpu"), (torch.Tensor, "nonzero"), (torch.Tensor, "tolist"),
         (torch.Tensor, "bincount"), (torch, "nonzero"), (torch, "bincount")]


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} on the hot path: a host sync on CUDA (and a capture breaker)")
        return call

    with monkeypatch.context() as patch:
        for owner, name in SYNCS:
            patch.setattr(owner, name, refuse(name))
        yield


def _backward(out):
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().sum() for o in outs if o.is_floating_point() and o.requires_grad).backward()


def _leaf(*shape):
    return torch.randn(shape).requires_grad_()


OPS = {
    "reparameterize": lambda: fastvae.reparameterize(_leaf(6, 9), _leaf(6, 9)),
    "gaussian_kl": lambda: fastvae.gaussian_kl(_leaf(6, 9), _leaf(6, 9)),
    "gaussian_kl_prior": lambda: fastvae.gaussian_kl(_leaf(6, 9), _leaf(6, 9), _leaf(9), None),
    "reparameterize_kl": lambda: fastvae.reparameterize_kl(_leaf(6, 9), _leaf(6, 9)),
    "gumbel_softmax": lambda: fastvae.gumbel_softmax(_leaf(6, 9), 0.5, hard=True),
    "gumbel_softmax_soft": lambda: fastvae.gumbel_softmax(_leaf(6, 9), 0.5),
    "gumbel_softmax_tensor_tau": lambda: fastvae.gumbel_softmax(_leaf(6, 9), torch.tensor(0.5)),
    "categorical_kl": lambda: fastvae.categorical_kl(_leaf(6, 9), _leaf(6, 9)),
    "nearest_code": lambda: fastvae.nearest_code(torch.randn(30, 5), torch.randn(7, 5)),
    "vector_quantize": lambda: fastvae.vector_quantize(_leaf(30, 5), _leaf(7, 5)),
}
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_public_ops_make_no_host_sync(monkeypatch, backend_name, op, deterministic):
    torch.use_deterministic_algorithms(deterministic)
    try:
        with fastvae.use_backend(backend_name), no_host_sync(monkeypatch):
            out = OPS[op]()
            if op != "nearest_code":
                _backward(out)
    finally:
        torch.use_deterministic_algorithms(False)


MODULES = {
    "Reparameterize": (lambda: fastvae.nn.Reparameterize(), lambda: (_leaf(6, 9), _leaf(6, 9))),
    "GaussianKL": (lambda: fastvae.nn.GaussianKL(), lambda: (_leaf(6, 9), _leaf(6, 9))),
    "GumbelSoftmax": (lambda: fastvae.nn.GumbelSoftmax(0.5, hard=True), lambda: (_leaf(6, 9),)),
    "VectorQuantizer": (lambda: fastvae.nn.VectorQuantizer(16, 5), lambda: (_leaf(4, 5, 3, 3).movedim(1, -1),)),
    "VectorQuantizer_ema_dead_codes": (
        lambda: fastvae.nn.VectorQuantizer(16, 5, channel_dim=1, ema_decay=0.9, dead_code_threshold=0.5),
        lambda: (_leaf(4, 5, 3, 3),)),
    "ResidualVectorQuantizer_ema": (
        lambda: fastvae.nn.ResidualVectorQuantizer(3, 16, 5, ema_decay=0.9, dead_code_threshold=0.5),
        lambda: (_leaf(30, 5),)),
    "GumbelQuantizer": (lambda: fastvae.nn.GumbelQuantizer(6, 16, 5), lambda: (_leaf(2, 6, 3, 3),)),
}


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_module_training_steps_make_no_host_sync(monkeypatch, backend_name, module):
    if module.startswith("ResidualVectorQuantizer"):
        requires(backend_name, "residual_quantize_backward")
    make, inputs = MODULES[module]
    layer = make().train()
    args = inputs()
    with fastvae.use_backend(backend_name), no_host_sync(monkeypatch):
        for _ in range(2):
            _backward(layer(*args))


def _cuda_inputs(op):
    """Static CUDA inputs for ``op`` of OPS, made outside capture."""
    leaf = lambda *shape: torch.randn(shape, device="cuda").requires_grad_()  # noqa: E731
    return {
        "reparameterize": lambda a, b: fastvae.reparameterize(a, b),
        "gaussian_kl": lambda a, b: fastvae.gaussian_kl(a, b),
        "reparameterize_kl": lambda a, b: fastvae.reparameterize_kl(a, b),
        "gumbel_softmax": lambda a, b: fastvae.gumbel_softmax(a, 0.5, hard=True),
        "categorical_kl": lambda a, b: fastvae.categorical_kl(a, b),
        "vector_quantize": lambda a, b: fastvae.vector_quantize(a, b[:100]),
    }[op], (leaf(512, 64), leaf(512, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["reparameterize", "gaussian_kl", "reparameterize_kl", "gumbel_softmax",
                                "categorical_kl", "vector_quantize"])
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_each_op_is_captured_by_a_cuda_graph_and_replays(backend_name, op):
    """Forward + backward of each op captured in one torch.cuda.graph, replayed: same
    outputs as an eager call with the same seed state."""
    fn, inputs = _cuda_inputs(op)
    with fastvae.use_backend(backend_name):
        if any(fastvae._backend._BACKENDS[backend_name].why_not(o, "cuda", torch.float32) for o in (op,)):
            pytest.skip(f"{backend_name} has no CUDA kernel for {op}")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compile and cache outside capture
                _backward(fn(*inputs))
        torch.cuda.current_stream().wait_stream(stream)
        for t in inputs:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*inputs)
            _backward(out)
        graph.replay()
        torch.cuda.synchronize()
        outs = out if isinstance(out, tuple) else (out,)
        assert all(torch.isfinite(o.float()).all() for o in outs if o.is_floating_point())
        assert all(torch.isfinite(t.grad).all() for t in inputs if t.grad is not None)
