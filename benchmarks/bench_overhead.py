"""Per-call overhead (checks, seed, autograd, dispatch), which plain eager CPU calls of the
native backend pay in C++ (csrc/eager.cpp).

Two parts, each against the eager PyTorch a user would otherwise write:

* the targets of small-model training steps, forward+backward: reparameterize +
  gaussian_kl(reduction="sum") with the loss ``z.sum() + kl`` at (128, 20) and
  (256, 128) (pytorch/examples' VAE loss), gumbel_softmax at (128, 10) and (256, 512),
  vector_quantize of (1024, 64) tokens on 512 codes against eager's distance expansion
  + argmin + straight-through; the target speed-up is printed with each case;
* each public op at a one-element input and at (256, 128), forward only, without and
  with inputs requiring grad (target: one-element calls with grad no slower than eager).

    python benchmarks/bench_overhead.py [--device cuda]
    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py --clock cpu   # steady on a shared machine
    FASTVAE_CPU_ISA=baseline python benchmarks/bench_overhead.py   # the portable kernels
"""
import torch
import torch.nn.functional as F

import fastvae
import harness
from harness import Case, fastvae_candidates


def eager_kl(mu, logvar):
    return 0.5 * torch.sum(torch.exp(logvar) + mu * mu - 1.0 - logvar) / mu.shape[0]


def calls(shape, device, grad):
    mu = torch.randn(shape, device=device, requires_grad=grad)
    logvar = torch.randn(shape, device=device)
    codebook = torch.randn(16, shape[-1], device=device)
    return {
        "reparameterize": (lambda: fastvae.reparameterize(mu, logvar),
                           lambda: mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)),
        "gaussian_kl": (lambda: fastvae.gaussian_kl(mu, logvar), lambda: eager_kl(mu, logvar)),
        "gumbel_softmax": (lambda: fastvae.gumbel_softmax(mu), lambda: F.gumbel_softmax(mu)),
        "vector_quantize": (lambda: fastvae.vector_quantize(mu, codebook),
                            lambda: codebook[torch.cdist(mu, codebook).argmin(-1)]),
    }


def _step(loss_of, *leaves):
    """A training step: grads reset, ``loss_of(*leaves)`` computed and back-propagated."""
    def step():
        for leaf in leaves:
            leaf.grad = None
        loss_of(*leaves).backward()

    return step


def gaussian_step(device, shape):
    mu, logvar = (torch.randn(shape, device=device, requires_grad=True) for _ in range(2))

    def ours(mu, logvar):
        z = fastvae.reparameterize(mu, logvar)
        return z.sum() + fastvae.gaussian_kl(mu, logvar, reduction="sum")

    def eager(mu, logvar):  # pytorch/examples' VAE: reparameterize and loss_function
        std = torch.exp(0.5 * logvar)
        z = mu + torch.randn_like(std) * std
        return z.sum() + -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())

    return _step(ours, mu, logvar), _step(eager, mu, logvar)


def gumbel_step(device, shape):
    logits = torch.randn(shape, device=device, requires_grad=True)
    weight = torch.randn(shape, device=device)  # a loss whose gradient is not the softmax's null direction
    return (_step(lambda x: (fastvae.gumbel_softmax(x) * weight).sum(), logits),
            _step(lambda x: (F.gumbel_softmax(x) * weight).sum(), logits))


def vq_step(device, tokens, dim, codes, beta=0.25):
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    codebook = torch.randn(codes, dim, device=device, requires_grad=True)

    def ours(x, codebook):
        quantized, _, loss = fastvae.vector_quantize(x, codebook, beta=beta)
        return quantized.sum() + loss

    def eager(x, codebook):  # the VQ-VAE layer of most code bases
        distances = (x * x).sum(1, keepdim=True) - 2 * x @ codebook.t() + (codebook * codebook).sum(1)
        selected = codebook[distances.argmin(1)]
        loss = F.mse_loss(selected, x.detach()) + beta * F.mse_loss(x, selected.detach())
        return (x + (selected - x).detach()).sum() + loss

    return _step(ours, x, codebook), _step(eager, x, codebook)


GAUSSIAN_OPS = ("reparameterize", "gaussian_kl")
# (name, shape, the backend functions it runs, steps, target speed-up over eager)
TARGETS = [
    ("reparameterize + gaussian_kl(sum)", (128, 20), GAUSSIAN_OPS, lambda d: gaussian_step(d, (128, 20)), 2.0),
    ("reparameterize + gaussian_kl(sum)", (256, 128), GAUSSIAN_OPS, lambda d: gaussian_step(d, (256, 128)), 3.0),
    ("gumbel_softmax", (128, 10), ("gumbel_softmax",), lambda d: gumbel_step(d, (128, 10)), 1.5),
    ("gumbel_softmax", (256, 512), ("gumbel_softmax",), lambda d: gumbel_step(d, (256, 512)), 1.5),
    ("vector_quantize, 512 codes", (1024, 64), ("vector_quantize",), lambda d: vq_step(d, 1024, 64, 512), 2.0),
]


def cases(args):
    for op, shape, backend_ops, steps, target in TARGETS:
        ours, eager = steps(args.device)
        candidates = fastvae_candidates(ours, args.device, backend_ops)
        candidates["torch eager"] = eager
        yield Case(op, shape, candidates, device=args.device, mode="forward+backward",
                   targets=[("torch eager", target, f">= {target:g}x eager")])
    for shape in [(1, 1), (256, 128)]:
        for grad in (False, True):
            for op, (ours, eager) in calls(shape, args.device, grad).items():
                candidates = fastvae_candidates(ours, args.device, (op,))
                candidates["torch eager"] = eager
                yield Case(op, shape, candidates, device=args.device,
                           mode="forward, inputs requiring grad" if grad else "forward",
                           targets=[("torch eager", 1.0, "no slower than eager")] if grad and shape == (1, 1) else ())


if __name__ == "__main__":
    harness.main("overhead", cases, __doc__)
