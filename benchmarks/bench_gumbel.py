"""Gumbel column: gumbel_softmax (soft and hard) against F.gumbel_softmax, and
categorical_kl against the textbook log_softmax expression, eager and torch.compile,
forward and forward+backward.

    python benchmarks/bench_gumbel.py [--device cuda] [--quick]

Floor: forward reads the logits and writes the sample (2 tensors); backward reads one
saved tensor and the output gradient and writes the logits' gradient (3 more). The saved
tensor is the soft sample itself for hard=False (a softmax backward), the logits for
hard=True (the noise is regenerated from the seed, never stored). categorical_kl reads
the logits (forward), then reads them again and writes their gradient (backward).
"""
import math

import torch
import torch.nn.functional as F

import fastvae
import harness
from harness import Case, against_torch, compiled, forward_backward

CPU_SHAPES = [(256, 64), (4096, 512), (32768, 8192)]
GPU_SHAPES = [(256, 64), (4096, 512), (32768, 8192)]
# Eager PyTorch takes tens of seconds per call at the largest CPU shape: fewer samples there.
LARGE_ELEMENTS = 2**26
LARGE_SAMPLES = 2


def cases(args):
    on_gpu = args.device.startswith("cuda")
    shapes = (GPU_SHAPES if on_gpu else CPU_SHAPES)[:1 if args.quick else None]
    for dtype in harness.dtypes(args):
        for shape in shapes:
            logits = torch.randn(shape, device=args.device, dtype=dtype)
            size = logits.element_size() * logits.numel()
            for hard in (False, True):
                def ours(x, hard=hard):
                    return fastvae.gumbel_softmax(x, tau=1.0, hard=hard)

                def eager(x, hard=hard):
                    return F.gumbel_softmax(x, tau=1.0, hard=hard)

                comp = compiled(eager, args)
                op = "gumbel_softmax_hard" if hard else "gumbel_softmax"
                backward_op = "gumbel_softmax_backward" if hard else "gumbel_softmax_backward_from_sample"
                for mode, moved, impl_ops, wrap in (
                        ("forward", 2 * size, ("gumbel_softmax",), lambda f: (lambda: f(logits))),
                        ("forward+backward", 5 * size, ("gumbel_softmax", backward_op),
                         lambda f: forward_backward(f, logits))):
                    candidates = against_torch(wrap(ours), wrap(eager), None if comp is None else wrap(comp),
                                               args.device, impl_ops)
                    large = logits.numel() >= LARGE_ELEMENTS and not on_gpu
                    yield Case(op, shape, candidates, bytes_moved=moved, device=args.device, dtype=dtype, mode=mode,
                               max_samples=LARGE_SAMPLES if large else None)

            yield from categorical_kl_cases(logits, size, args)


def eager_categorical_kl(logits):
    """KL(softmax(logits) || uniform) per row, batchmean: the dVAE's textbook term."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p + math.log(logits.shape[-1]))).sum() / logits.shape[0]


def categorical_kl_cases(logits, size, args):
    comp = compiled(eager_categorical_kl, args)
    large = logits.numel() >= LARGE_ELEMENTS and not args.device.startswith("cuda")
    # forward reads the logits once; backward reads them again and writes their gradient
    for mode, moved, impl_ops, wrap in (
            ("forward", size, ("categorical_kl",), lambda f: (lambda: f(logits))),
            ("forward+backward", 3 * size, ("categorical_kl", "categorical_kl_backward"),
             lambda f: forward_backward(f, logits))):
        candidates = against_torch(wrap(fastvae.categorical_kl), wrap(eager_categorical_kl),
                                   None if comp is None else wrap(comp), args.device, impl_ops)
        yield Case("categorical_kl", tuple(logits.shape), candidates, bytes_moved=moved, device=args.device,
                   dtype=logits.dtype, mode=mode, max_samples=LARGE_SAMPLES if large else None)


if __name__ == "__main__":
    harness.main("gumbel", cases, __doc__)
