"""Per-call overhead of the Python layer (checks, seed, custom op, autograd, dispatch):
each public op at a one-element input and at (256, 128), against the eager PyTorch
expression it replaces, without and with autograd.

    python benchmarks/bench_overhead.py [--device cuda]
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


def cases(args):
    for shape in [(1, 1), (256, 128)]:
        for grad in (False, True):
            for op, (ours, eager) in calls(shape, args.device, grad).items():
                candidates = fastvae_candidates(ours, args.device, (op,))
                candidates["torch eager"] = eager
                yield Case(op, shape, candidates, device=args.device,
                           mode="forward, inputs requiring grad" if grad else "forward")


if __name__ == "__main__":
    harness.main("overhead", cases, __doc__)
