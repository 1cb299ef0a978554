"""Gaussian column: reparameterize, gaussian_kl, reparameterize_kl against eager PyTorch
and torch.compile, forward and forward+backward; and the latent-diffusion posterior
(fastvae.nn.DiagonalGaussian's sample() + kl()) against diffusers' DiagonalGaussianDistribution.

    python benchmarks/bench_gaussian.py [--device cuda] [--quick]
"""
import torch

import fastvae
import fastvae.nn
import harness
from harness import Case, against_torch, compiled, forward_backward

CPU_SHAPES = [(256, 128), (4096, 512), (65536, 256)]
GPU_SHAPES = [(65536, 256), (1048576, 256)]
CPU_DEFAULT_SHAPES = [(4096, 512)]  # the default suite's (see harness.shapes)
# Encoder outputs (B, 2C, H, W): a Stable-Diffusion-like latent of 8 channels at 64x64
POSTERIOR_SHAPES = [(16, 16, 64, 64)]


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
    shapes = harness.shapes(args, GPU_SHAPES if on_gpu else CPU_SHAPES, CPU_DEFAULT_SHAPES)
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
        yield from posterior_cases(args, dtype)


def posterior_cases(args, dtype):
    """sample() + kl() of the posterior, forward+backward (what a VAE training step calls)."""
    try:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    except ImportError:
        print("diffusers not installed (pip install diffusers): posterior benchmark skipped")
        return

    def ours(params):
        posterior = fastvae.nn.DiagonalGaussian(params)
        return posterior.sample(), posterior.kl()

    def diffusers(params):
        posterior = DiagonalGaussianDistribution(params)
        return posterior.sample(), posterior.kl()

    for shape in harness.shapes(args, POSTERIOR_SHAPES, POSTERIOR_SHAPES):
        params = torch.randn(shape, device=args.device, dtype=dtype)
        half = params.element_size() * params.numel() // 2
        comp = compiled(diffusers, args)
        # read mean and logvar, write z; backward: read grad_z, mean, logvar, write the
        # parameters' gradient (both halves)
        candidates = against_torch(forward_backward(ours, params), forward_backward(diffusers, params),
                                   None if comp is None else forward_backward(comp, params), args.device,
                                   ("reparameterize", "reparameterize_backward", "gaussian_kl", "gaussian_kl_backward"))
        yield Case("DiagonalGaussian sample+kl", shape, candidates, bytes_moved=10 * half, device=args.device,
                   dtype=dtype, mode="forward+backward")


if __name__ == "__main__":
    harness.main("gaussian", cases, __doc__)
