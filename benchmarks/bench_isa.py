"""The native kernels at each instruction-set level this CPU runs (fastvae/_cpu_isa.py):
every built level's module, fastvae._C_<level>, loaded side by side in one process and
timed interleaved on one thread, each lower level as a multiple of the best level's time.
The time is the process's time on the CPU (the harness's ``--clock cpu``, this benchmark's
default; one thread, so no other thread's time counts), which a loaded machine does not
inflate as it does wall time (``--clock wall`` for that).
Target (issue 15): the baseline level at most 3x the best level's time on every op.

    python benchmarks/bench_isa.py [--quick] [--samples N] [--only nearest_code] [--clock wall]

Needs the extension built with every level (the default; FASTVAE_CPU_ISA_BUILD=native
builds one, and then there is nothing to compare). Not part of the main job (run_all.py),
which builds only the CPU's own level.
"""
import importlib

import torch

import harness
from harness import Case

TARGET = 3.0  # the baseline level's time over the best level's, at most


def built_levels():
    """{level name: module} of every level this CPU runs and the build has, lowest first."""
    from fastvae import _native

    modules = {}
    for name in _native.runnable_levels():
        try:
            modules[name] = importlib.import_module(f"fastvae._C_{name}")
        except ModuleNotFoundError:
            print(f"level {name}: not built (FASTVAE_CPU_ISA_BUILD at build time), left out")
    return modules


def op_calls(quick, module):
    """{op: (shape, call(module))}: the raw kernels the native backend's ops run (``module``
    draws the sample the backward kernels take)."""
    rows, cols = (256, 512) if quick else (2048, 512)
    tokens, dim, codes = (512, 64, 512) if quick else (4096, 64, 512)
    generator = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(rows, cols, generator=generator), torch.randn(rows, cols, generator=generator)
    grad_z = torch.randn(rows, cols, generator=generator)
    seed, tau = torch.tensor([1234]), torch.tensor([0.7])
    x, codebook = torch.randn(tokens, dim, generator=generator), torch.randn(codes, dim, generator=generator)
    z = module.reparameterize(mu, logvar, seed)
    return {
        "reparameterize": ((rows, cols), lambda m: m.reparameterize(mu, logvar, seed)),
        "reparameterize_backward": ((rows, cols),
                                    lambda m: m.reparameterize_backward(grad_z, mu, logvar, z, seed, True)),
        "gaussian_kl": ((rows, cols), lambda m: m.gaussian_kl(mu, logvar, None, None, "sum")),
        "gumbel_softmax": ((rows, cols), lambda m: m.gumbel_softmax(mu, seed, tau, False, 1)),
        "gumbel_softmax_backward": ((rows, cols), lambda m: m.gumbel_softmax_backward(grad_z, mu, seed, tau, 1)),
        "categorical_kl": ((rows, cols), lambda m: m.categorical_kl(mu, None, 1, "sum")),
        "nearest_code": ((tokens, dim, codes), lambda m: m.nearest_code(x, codebook)),
        "vector_quantize": ((tokens, dim, codes), lambda m: m.vector_quantize(x, codebook, 0.25)),
    }


def level_cases(args, modules):
    best = list(modules)[-1]
    for op, (shape, call) in op_calls(harness.suite(args) == "quick", modules[best]).items():
        # The best level is the "fastvae" candidate, so each lower level's speed-up column
        # is its time over the best level's.
        candidates = {f"fastvae[{best}]": lambda call=call: call(modules[best])}
        for name in list(modules)[:-1]:
            candidates[name] = lambda call=call, name=name: call(modules[name])
        yield Case(op, shape, candidates, mode="forward, 1 thread")


def main():
    parser = harness.parser(__doc__)
    parser.set_defaults(clock="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    modules = built_levels()
    if len(modules) < 2:
        raise SystemExit(f"only {list(modules)} built: rebuild with every level (FASTVAE_CPU_ISA_BUILD unset)")
    records = []
    for case in filter(lambda case: harness.selected(case, args), level_cases(args, modules)):
        records += harness.run_case(case, args)
        path = harness.save("isa", records, args, args.out)
    best, middle = list(modules)[-1], list(modules)[1:-1]
    print(f"\nbaseline level's time over the best level's ({best}), 1 thread"
          + "".join(f"; over {name}'s" for name in middle) + ":")
    times = {(r["op"], r["candidate"].removeprefix("fastvae[").rstrip("]")): r["median_ms"] for r in records}
    for op in dict.fromkeys(r["op"] for r in records):
        ratio = times[op, "baseline"] / times[op, best]
        others = "".join(f"   {times[op, 'baseline'] / times[op, name]:5.2f}x {name}" for name in middle)
        print(f"  {op:<26}{ratio:6.2f}x   target <= {TARGET:g}x: {'met' if ratio <= TARGET else 'not met':<8}{others}")
    print(f"\nresults written to {path}")


if __name__ == "__main__":
    main()
