"""Gaussian column: reparameterize, gaussian_kl, reparameterize_kl against eager PyTorch
and torch.compile, forward and forward+backward.

    python benchmarks/bench_gaussian.py [--device cuda] [--quick]
"""
import torch

import fastvae
import harness
from harness import Case, against_torch, compiled, forward_backward

CPU_SHAPES = [(256, 128), (4096, 512), (65536, 256)]
GPU_SHAPES = [(65536, 256), (1048576, 256)]


def eager_reparameterize(mu, logvar):
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def eager_gaussian_kl(mu, logvar):
    return 0.5 * torch.sum(torch.exp(logvar) + mu * mu - 1.0 - logvar) / mu.shape[0]


def eager_reparameterize_kl(mu, logvar):
    return eager_reparameterize(mu, logvar), eager_gaussian_kl(mu, logvar)


# op -> (fastvae function, the eager expression it replaces, tensors it writes per input)
OPS = {
    "reparameterize": (fastvae.reparameterize, eager_reparameterize, 1),
    "gaussian_kl": (fastvae.gaussian_kl, eager_gaussian_kl, 0),
    "reparameterize_kl": (fastvae.reparameterize_kl, eager_reparameterize_kl, 1),
}


def cases(args):
    on_gpu = args.device.startswith("cuda")
    shapes = (GPU_SHAPES if on_gpu else CPU_SHAPES)[:1 if args.quick else None]
    for dtype in harness.dtypes(args):
        for shape in shapes:
            mu = torch.randn(shape, device=args.device, dtype=dtype)
            logvar = torch.randn(shape, device=args.device, dtype=dtype)
            size = mu.element_size() * mu.numel()
            for op, (ours, eager, writes) in OPS.items():
                comp = compiled(eager, args)
                # forward: read mu, logvar, write the outputs. backward: read the output
                # grad (if any) and mu/logvar, write two input grads.
                for mode, moved, impl_ops, wrap in (
                        ("forward", (2 + writes) * size, (op,), lambda f: (lambda: f(mu, logvar))),
                        ("forward+backward", (2 + writes) * size + (writes + 4) * size, (op, op + "_backward"),
                         lambda f: forward_backward(f, mu, logvar))):
                    candidates = against_torch(wrap(ours), wrap(eager), None if comp is None else wrap(comp),
                                               args.device, impl_ops)
                    yield Case(op, shape, candidates, bytes_moved=moved, device=args.device, dtype=dtype, mode=mode)


if __name__ == "__main__":
    harness.main("gaussian", cases, __doc__)
