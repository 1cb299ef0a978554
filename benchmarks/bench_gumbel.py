"""Gumbel column: gumbel_softmax (soft and hard) against F.gumbel_softmax eager and
torch.compile, forward and forward+backward.

    python benchmarks/bench_gumbel.py [--device cuda] [--quick]

Floor: forward reads the logits and writes the sample (2 tensors); backward reads one
saved tensor and the output gradient and writes the logits' gradient (3 more). The saved
tensor is the soft sample itself for hard=False (a softmax backward), the logits for
hard=True (the noise is regenerated from the seed, never stored).
"""
import argparse

import torch
import torch.nn.functional as F

import fastvae
from harness import Case, compiled, fastvae_candidates, forward_backward, parser, run_case, save

CPU_SHAPES = [(256, 64), (4096, 512), (32768, 8192)]
GPU_SHAPES = [(256, 64), (4096, 512), (32768, 8192)]
# The pure-PyTorch reference backend builds int64 Philox counters for every element:
# gigabytes of temporaries at the largest shape, and no contender; it is timed below this.
REFERENCE_MAX_ELEMENTS = 2**16
# Eager PyTorch takes tens of seconds per call at the largest CPU shape: fewer samples there.
LARGE_ELEMENTS = 2**26
LARGE_SAMPLES = 2


def cases(args):
    on_gpu = args.device.startswith("cuda")
    shapes = (GPU_SHAPES if on_gpu else CPU_SHAPES)[:1 if args.quick else None]
    for dtype in [torch.float32, torch.bfloat16] if on_gpu else [torch.float32]:
        for shape in shapes:
            # One compiled function serves every shape; a fresh cache per shape keeps it
            # under dynamo's recompile limit (past it, "torch.compile" silently runs eager).
            torch._dynamo.reset()
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
                    candidates = fastvae_candidates(wrap(ours), args.device, impl_ops)
                    if logits.numel() > REFERENCE_MAX_ELEMENTS:
                        candidates.pop("fastvae[torch]", None)
                    candidates["torch eager"] = wrap(eager)
                    if comp is not None:
                        candidates["torch.compile"] = wrap(comp)
                    yield Case(op, shape, candidates, bytes_moved=moved, device=args.device, dtype=dtype, mode=mode)


def main():
    args = parser(__doc__).parse_args()
    records = []
    for case in cases(args):
        large = case.shape[0] * case.shape[1] >= LARGE_ELEMENTS and not args.device.startswith("cuda")
        case_args = argparse.Namespace(**{**vars(args), "samples": min(args.samples, LARGE_SAMPLES)}) if large else args
        records += run_case(case, case_args)
    save("gumbel", records, args.device, args.out)


if __name__ == "__main__":
    main()
