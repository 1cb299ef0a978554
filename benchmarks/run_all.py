"""Run every ``bench_*.py`` here in turn with the same arguments (the main job).

    python benchmarks/run_all.py [--device cuda] [--quick] [--no-compile]
"""
import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    failed = []
    for path in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
        print(f"\n=== {os.path.basename(path)}", flush=True)
        if subprocess.call([sys.executable, path, *sys.argv[1:]], cwd=HERE) != 0:
            failed.append(os.path.basename(path))
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
