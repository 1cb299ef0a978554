"""The contract of API.md as its users exercise it, where no op column's file covers it:
meta tensors (shape inference, as PyTorch's own ops support) and the layers' argument checks."""
import pytest
import torch

import fastvae
import fastvae.nn


def _meta(*shape):
    return torch.empty(shape, device="meta")


# (name, call, expected output shapes): every public op on meta tensors gives its outputs' shapes.
META_CALLS = [
    ("reparameterize", lambda: fastvae.reparameterize(_meta(4, 6), _meta(4, 6)), [(4, 6)]),
    ("gaussian_kl", lambda: fastvae.gaussian_kl(_meta(4, 6), _meta(4, 6), reduction="per_sample"), [(4,)]),
    ("reparameterize_kl", lambda: fastvae.reparameterize_kl(_meta(4, 6), _meta(4, 6)), [(4, 6), ()]),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(_meta(4, 6), hard=True), [(4, 6)]),
    ("categorical_kl", lambda: fastvae.categorical_kl(_meta(4, 6), reduction="none"), [(4,)]),
    ("nearest_code", lambda: fastvae.nearest_code(_meta(2, 3, 6), _meta(5, 6)), [(2, 3), (2, 3)]),
    ("vector_quantize", lambda: fastvae.vector_quantize(_meta(2, 3, 6), _meta(5, 6)), [(2, 3, 6), (2, 3), ()]),
    ("residual_quantize", lambda: fastvae.residual_quantize(_meta(2, 3, 6), _meta(4, 5, 6)),
     [(2, 3, 6), (2, 3, 4), (4,)]),
    ("kmeans", lambda: fastvae.kmeans(_meta(10, 6), 3), [(3, 6), (10,)]),
    ("VectorQuantizer", lambda: fastvae.nn.VectorQuantizer(8, 6, channel_dim=1, device="meta")(_meta(2, 6, 3)),
     [(2, 6, 3), (2, 3), ()]),
    ("VectorQuantizer-ema", lambda: fastvae.nn.VectorQuantizer(8, 6, ema_decay=0.9, dead_code_threshold=1.0,
                                                               device="meta")(_meta(10, 6)), [(10, 6), (10,), ()]),
    ("ResidualVectorQuantizer", lambda: fastvae.nn.ResidualVectorQuantizer(2, 8, 6, ema_decay=0.9,
                                                                           device="meta")(_meta(10, 6)),
     [(10, 6), (10, 2), (2,)]),
]


@pytest.mark.parametrize("backend_name", ["auto", "torch"])
@pytest.mark.parametrize("name, call, shapes", META_CALLS, ids=[c[0] for c in META_CALLS])
def test_meta_tensors_give_the_output_shapes(backend_name, name, call, shapes):
    """``device="meta"`` (a model built with ``torch.device("meta")``, shape inference): the
    ops give meta outputs of the right shapes, the VQ search included (its reference runs a
    value-dependent exactness check, which meta tensors cannot answer)."""
    with fastvae.use_backend(backend_name):
        outputs = call()
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert [tuple(t.shape) for t in outputs] == shapes
    assert all(t.device.type == "meta" for t in outputs)


def test_meta_vector_quantize_backward():
    x = torch.empty(4, 6, device="meta", requires_grad=True)
    codebook = torch.empty(5, 6, device="meta", requires_grad=True)
    quantized, _, loss = fastvae.vector_quantize(x, codebook)
    (quantized.sum() + loss).backward()
    assert x.grad.shape == x.shape and codebook.grad.shape == codebook.shape


def _residual_kmeans_layer():
    return fastvae.nn.ResidualVectorQuantizer(2, 8, 4, kmeans_init=True)


# (make the layer, its bad input, error, message): checked before anything runs (k-means
# fitting, dead-code restarts), naming the argument.
BAD_LAYER_INPUTS = [
    (_residual_kmeans_layer, torch.randn(30, 5), ValueError, "x has 5 features along channel_dim=-1"),
    (lambda: fastvae.nn.ResidualVectorQuantizer(2, 8, 4, channel_dim=1), torch.randn(3, 5, 7), ValueError,
     "x has 5 features along channel_dim=1"),
    (lambda: fastvae.nn.ResidualVectorQuantizer(2, 8, 4, channel_dim=3), torch.randn(3, 4), ValueError,
     "channel_dim=3 is out of range"),
    (_residual_kmeans_layer, torch.ones(30, 4, dtype=torch.long), TypeError, "x must be a float"),
]


@pytest.mark.parametrize("make, x, error, message", BAD_LAYER_INPUTS)
def test_residual_quantizer_checks_its_input_first(make, x, error, message):
    layer = make()
    state = {name: value.clone() for name, value in layer.state_dict().items()}
    with pytest.raises(error, match=message):
        layer(x)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, state[name]), f"{name} changed by a rejected call"


@pytest.mark.parametrize("option, value, error", [
    ("ema_decay", "0.9", TypeError), ("ema_decay", float("nan"), ValueError),
    ("dead_code_threshold", "1", TypeError), ("dead_code_threshold", float("inf"), ValueError)])
def test_quantizer_options_are_checked_by_name(option, value, error):
    with pytest.raises(error, match=option):
        fastvae.nn.VectorQuantizer(8, 4, **{option: value})


def test_residual_quantizer_takes_numpy_stage_counts():
    import numpy as np

    layer = fastvae.nn.ResidualVectorQuantizer(3, 8, 4).eval()
    x = torch.randn(5, 4)
    _, indices, losses = layer(x, num_quantizers=np.int64(2))
    assert indices.shape == (5, 2) and losses.shape == (2,)


DEFAULT_ARGUMENT_CALLS = {
    "vector_quantize": lambda x, codebook: fastvae.vector_quantize(x, codebook),
    "residual_quantize": lambda x, codebook: fastvae.residual_quantize(x, codebook[None]),
    "gumbel_softmax": lambda x, codebook: fastvae.gumbel_softmax(x),
    "gumbel_quantize": lambda x, codebook: fastvae.gumbel_quantize(x, codebook.t()),
}


@pytest.mark.parametrize("name", DEFAULT_ARGUMENT_CALLS)
def test_default_arguments_compile_with_dynamic_shapes(name):
    """``torch.compile(dynamic=True)`` traces a float default argument (``beta=0.25``,
    ``tau=1.0``) as a symbolic float: its check must not break the graph."""
    torch._dynamo.reset()
    compiled = torch.compile(DEFAULT_ARGUMENT_CALLS[name], fullgraph=True, dynamic=True, backend="eager")
    for rows in (5, 7):
        compiled(torch.randn(rows, 4), torch.randn(3, 4))


def test_dim_takes_numpy_ints_as_pytorch_does(backend):
    """``F.gumbel_softmax(logits, dim=np.int64(0))`` works (PyTorch takes any integer for a
    dim): so does the drop-in, with the same sample as for the Python int."""
    import numpy as np

    logits = torch.randn(5, 4)
    for dim in (np.int64(0), np.int32(-1)):
        torch.manual_seed(1)
        got = fastvae.gumbel_softmax(logits, 0.5, True, dim=dim)
        torch.manual_seed(1)
        assert torch.equal(got, fastvae.gumbel_softmax(logits, 0.5, True, dim=int(dim)))
        assert torch.equal(fastvae.categorical_kl(logits, dim=dim, reduction="none"),
                           fastvae.categorical_kl(logits, dim=int(dim), reduction="none"))


@pytest.mark.parametrize("make", [
    lambda: fastvae.nn.ResidualVectorQuantizer(2, 16, 6, dead_code_threshold=0.1),
    lambda: fastvae.nn.ResidualVectorQuantizer(2, 16, 6, dead_code_threshold=0.1, ema_decay=0.9, shared_codebook=True),
], ids=["residual-restarts", "residual-shared-ema-restarts"])
def test_residual_layer_with_restarts_compiles_fullgraph(make):
    torch._dynamo.reset()
    layer = make().train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    quantized, _, losses = compiled(torch.randn(9, 6, requires_grad=True))
    (quantized.sum() + losses.sum()).backward()


def test_dead_code_restarts_compile_with_dynamic_shapes_under_inductor():
    """A training step with dead-code restarts under ``torch.compile(dynamic=True)``: the batch
    size is symbolic, and Inductor's CPU code generation failed on a fill by a symbolic bool."""
    torch._dynamo.reset()
    layer = fastvae.nn.VectorQuantizer(16, 6, dead_code_threshold=0.1).train()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for rows in (7, 9):
        quantized, _, loss = compiled(torch.randn(rows, 6, requires_grad=True))
        (quantized.sum() + loss).backward()
