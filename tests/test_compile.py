"""The custom ops as torch.compile / AOTAutograd see them: schemas and fake
implementations (torch.library.opcheck, on every backend), and whole functions calling each
public op compiled with fullgraph=True (no graph break) matching eager, forward and backward."""
import pytest
import torch
import torch._dynamo
import torch._inductor.config

import fastvae
from helpers import requires

SEED = torch.tensor([77])


def _op_args():
    mu, lv = torch.randn(4, 6), torch.randn(4, 6)
    logits = torch.randn(3, 5)
    x, cb = torch.randn(9, 4), torch.randn(6, 4)
    idx = torch.randint(6, (9,))
    return {
        "reparameterize": (mu, lv, SEED),
        "reparameterize_backward": (torch.randn(4, 6), mu, lv, torch.randn(4, 6), SEED, True),
        "gaussian_kl": (mu, lv, torch.randn(6), None, "batchmean"),
        "gaussian_kl_backward": (torch.randn(()), mu, lv, torch.randn(6), torch.randn(4, 1), "sum"),
        "reparameterize_kl": (mu, lv, SEED, "none"),
        "reparameterize_kl_backward": (torch.randn(4, 6), torch.randn(()), mu, lv, torch.randn(4, 6), SEED, "mean"),
        "gumbel_softmax": (logits, SEED, torch.tensor([0.5]), True, 1),
        "gumbel_softmax_backward": (torch.randn(3, 5), logits, SEED, torch.tensor([0.5]), 1),
        "gumbel_softmax_backward_from_sample": (torch.randn(3, 5), torch.softmax(logits, 1), torch.tensor([0.5]), 1),
        "categorical_kl": (logits, None, 1, "none"),
        "categorical_kl_backward": (torch.randn(()), logits, torch.randn(5), 1, "batchmean"),
        "nearest_code": (x, cb),
        "vector_quantize": (x, cb, 0.25),
        "vector_quantize_backward": (torch.randn(9, 4), torch.randn(()), x, cb, idx, 0.25),
    }


@pytest.mark.parametrize("op", sorted(_op_args()))
def test_opcheck(op, backend):
    requires(backend, op)
    torch.library.opcheck(getattr(torch.ops.fastvae, op).default, _op_args()[op])


def _compare_compiled(fn, inputs, compile_backend="aot_eager"):
    """Run ``fn`` eagerly and compiled (fullgraph) from the same RNG state; compare
    outputs and input gradients."""
    results = []
    for runner in (fn, torch.compile(fn, fullgraph=True, backend=compile_backend)):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        torch.manual_seed(123)
        out = runner(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() * (i + 1) for i, o in enumerate(outs) if o.is_floating_point()).backward()
        results.append((outs, [leaf.grad for leaf in leaves if leaf.is_floating_point()]))
    (eager_out, eager_grads), (comp_out, comp_grads) = results
    for a, b in zip(eager_out + tuple(eager_grads), comp_out + tuple(comp_grads)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


FUNCTIONS = {
    "reparameterize": (lambda mu, lv: fastvae.reparameterize(mu, lv) * 2, ((5, 8), (5, 8))),
    "gaussian_kl": (lambda mu, lv, pm: fastvae.gaussian_kl(mu, lv, pm, None, reduction="mean"), ((5, 8), (5, 8), (8,))),
    "reparameterize_kl": (lambda mu, lv: fastvae.reparameterize_kl(mu, lv), ((5, 8), (5, 8))),
    "gumbel_softmax": (lambda logits: fastvae.gumbel_softmax(logits, 0.5, hard=True, dim=1), ((2, 7, 3),)),
    # times the logits, so the soft sample's gradient is not constant along dim (which softmax maps to 0)
    "gumbel_softmax_soft": (lambda logits: fastvae.gumbel_softmax(logits, 0.5, dim=1) * logits, ((2, 7, 3),)),
    "categorical_kl": (lambda logits, prior: fastvae.categorical_kl(logits, prior), ((4, 7), (7,))),
    "vector_quantize": (lambda x, cb: fastvae.vector_quantize(x, cb)[0::2], ((2, 5, 4), (6, 4))),
}


# The ops a function of FUNCTIONS calls, where they are not <name> and <name>_backward.
OPS_CALLED = {"gumbel_softmax_soft": ("gumbel_softmax", "gumbel_softmax_backward_from_sample")}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_compiled_fullgraph_matches_eager(name, backend):
    requires(backend, *OPS_CALLED.get(name, (name, name + "_backward")))
    fn, shapes = FUNCTIONS[name]
    torch._dynamo.reset()
    _compare_compiled(fn, [torch.randn(s) for s in shapes])


def test_nearest_code_compiles_without_graph_break():
    x, cb = torch.randn(3, 4, 2), torch.randn(5, 2)
    compiled = torch.compile(lambda x, cb: fastvae.nearest_code(x, cb), fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, cb), fastvae.nearest_code(x, cb)):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_inductor_compiles_a_vae_step():
    """The default compiler (Inductor) on a small VAE-style step using several ops."""

    def step(mu, logvar, logits, x, codebook):
        z, kl = fastvae.reparameterize_kl(mu, logvar)
        y = fastvae.gumbel_softmax(logits, tau=0.7, hard=True)
        quantized, _, vq_loss = fastvae.vector_quantize(x, codebook)
        return (z.square().mean() + kl + (y * logits).sum() + quantized.sum() + vq_loss,)

    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        _compare_compiled(step, [torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 5), torch.randn(7, 3),
                                 torch.randn(5, 3)], compile_backend="inductor")


def test_generator_argument_breaks_fullgraph_but_compiles_with_a_graph_break(backend):
    """Dynamo cannot put a torch.Generator in a graph (plain torch.randn(generator=) fails
    the same way): fullgraph=True raises; the default mode breaks the graph there and
    matches eager."""
    requires(backend, "reparameterize")
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4)

    def sample(mu, logvar, generator):
        return fastvae.reparameterize(mu, logvar, generator=generator)

    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(sample, fullgraph=True, backend="aot_eager")(mu, logvar, torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    compiled = torch.compile(sample, backend="aot_eager")(mu, logvar, torch.Generator().manual_seed(5))
    assert torch.equal(compiled, sample(mu, logvar, torch.Generator().manual_seed(5)))


def test_double_backward_through_a_compiled_function_is_an_error(backend):
    """AOTAutograd has no double backward: PyTorch raises (never a silent drop); eager
    second derivatives are tested in test_double_backward.py."""
    requires(backend, "gaussian_kl", "gaussian_kl_backward")
    mu, logvar = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    torch._dynamo.reset()
    kl = torch.compile(lambda mu, logvar: fastvae.gaussian_kl(mu, logvar, reduction="sum"), fullgraph=True,
                       backend="aot_eager")(mu, logvar)
    grad_mu, = torch.autograd.grad(kl, mu, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grad_mu.sum(), mu)
