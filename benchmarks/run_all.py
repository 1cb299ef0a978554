"""The main job: every ``bench_*.py`` here that defines harness ``cases``, in one process
under one progress bar over all their cases, then the figures (``plots.py``).

    python benchmarks/run_all.py [--full | --quick] [--device cuda] [--no-compile] [--out DIR]

The default suite (every op, forward and forward+backward, against eager PyTorch,
``torch.compile`` and the peers, at representative shapes) takes a few minutes on a 2-core
CPU; ``--full`` runs every shape (tens of minutes there). On CUDA the GPU shapes run.
Results go to ``benchmarks/results/`` (``--out DIR``: ``DIR/<bench>.json``) and the figures
to ``figures/`` beside them.
"""
import glob
import importlib
import os
import sys

import harness

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    args = harness.parser(__doc__).parse_args()
    names = [os.path.basename(path)[len("bench_"):-len(".py")]
             for path in sorted(glob.glob(os.path.join(HERE, "bench_*.py")))]
    modules = {name: importlib.import_module(f"bench_{name}") for name in names}
    # A benchmark without harness cases (bench_distributed: its own processes) runs on its own.
    benches = [(name, module.cases) for name, module in modules.items() if hasattr(module, "cases")]
    for name in sorted(set(modules) - {name for name, _ in benches}):
        print(f"bench_{name}.py is not part of the main job; run it alone: python benchmarks/bench_{name}.py")
    paths, failed = harness.run_benches(benches, args)
    try:
        import plots
    except ImportError as error:
        print(f"\nfigures skipped ({error}; pip install matplotlib)")
    else:
        # with --out, this run's files alone; else every result file (the newest of each case)
        figures = plots.draw(list(paths.values()) if args.out else None,
                             os.path.join(args.out, "figures") if args.out else None)
        print("\nfigures:\n  " + "\n  ".join(figures))
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
