"""Figures (PNG) from benchmark result files, drawn by the main job after its run:

* ``<bench>-<hardware>.png``: a column per op; top, fastvae's speed-up over each
  alternative (eager PyTorch, ``torch.compile``, the peer libraries) at each shape and mode;
  bottom, the fraction of the hardware floor each candidate reaches (fastvae included);
* ``vq-memory-<hardware>.png``: peak memory of a ``vector_quantize`` forward (fastvae, the
  eager matmul expansion, vector-quantize-pytorch) against the codebook size K.

    python benchmarks/plots.py [RESULTS.json ...] [--out DIR]

Without files, every JSON file in ``benchmarks/results/``; where several files hold the same
case (bench, op, mode, shape, dtype, candidate), the newest one's record is drawn (by the
run's date, then the file's time). Figures go to ``benchmarks/results/figures/``.
"""
import argparse
import glob
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODE_LABELS = {"forward": "fwd", "forward+backward": "fwd+bwd", "forward, inputs requiring grad": "fwd, grad"}


def _hardware(environment):
    name = environment.get("gpu") or "cpu"
    return name.replace(" ", "_")


def load(paths):
    """``{(bench, hardware): [record, ...]}``, one record per case and candidate, the
    newest where files overlap."""
    dated = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        records = data.get("records", [])
        if not all({"op", "mode", "shape", "dtype", "candidate"} <= record.keys() for record in records):
            continue  # not the harness's records (bench_distributed writes its own kind)
        bench = data.get("bench") or os.path.basename(path).split("-")[0]
        environment = data.get("environment", {})
        dated.append(((environment.get("date", ""), os.path.getmtime(path)), bench, _hardware(environment),
                      records))
    newest = {}
    for _, bench, hardware, records in sorted(dated, key=lambda item: item[0]):
        for r in records:
            key = (bench, hardware, r["op"], r["mode"], tuple(r["shape"]), r["dtype"], r["candidate"])
            newest[key] = r
    groups = {}
    for (bench, hardware, *_), record in newest.items():
        groups.setdefault((bench, hardware), []).append(record)
    return groups


def _case_key(record):
    return record["mode"], tuple(record["shape"]), record["dtype"]


def _case_label(record, dtypes):
    label = "x".join(str(s) for s in record["shape"]) + "\n" + MODE_LABELS.get(record["mode"], record["mode"])
    return label + (f" {record['dtype']}" if len(dtypes) > 1 else "")


def _unique(items):
    return list(dict.fromkeys(items))


def _grouped_bars(ax, cases, series, value, log):
    """Bars of ``value(record)`` per series (candidate) side by side at each case."""
    width = 0.8 / max(1, len(series))
    drawn = False
    for i, (name, by_case) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, (key, _) in enumerate(cases) if value(by_case.get(key))]
        ys = [value(by_case[key]) for key, _ in cases if value(by_case.get(key))]
        if ys:
            bars = ax.bar(xs, ys, width, label=name)
            ax.bar_label(bars, fmt="%.2g", fontsize=6, padding=1)
            drawn = True
    if log and drawn:
        ax.set_yscale("log")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([label for _, label in cases], fontsize=7)
    return drawn


def draw_bench(bench, hardware, records, out_dir):
    """The speed-up / floor-fraction figure of one benchmark; returns its path."""
    ops = _unique(r["op"] for r in records)
    dtypes = _unique(r["dtype"] for r in records)
    columns = min(3, len(ops))
    pair_rows = math.ceil(len(ops) / columns)  # each op: a speed-up panel above a floor panel
    fig, axes = plt.subplots(2 * pair_rows, columns, figsize=(6.5 * columns, 3.4 * 2 * pair_rows), squeeze=False)
    for unused in range(len(ops), pair_rows * columns):
        axes[2 * (unused // columns)][unused % columns].axis("off")
        axes[2 * (unused // columns) + 1][unused % columns].axis("off")
    for index, op in enumerate(ops):
        row, column = 2 * (index // columns), index % columns
        rows = [r for r in records if r["op"] == op]
        rows.sort(key=lambda r: (list(MODE_LABELS).index(r["mode"]) if r["mode"] in MODE_LABELS else 9,
                                 math.prod(r["shape"]), r["dtype"]))
        cases = _unique((_case_key(r), _case_label(r, dtypes)) for r in rows)
        by_candidate = {}
        for r in rows:
            by_candidate.setdefault(r["candidate"], {})[_case_key(r)] = r
        alternatives = {name: by_case for name, by_case in by_candidate.items() if not name.startswith("fastvae")}
        top, bottom = axes[row][column], axes[row + 1][column]
        if _grouped_bars(top, cases, alternatives, lambda r: r and r.get("fastvae_speedup"), log=True):
            top.axhline(1.0, color="black", linewidth=0.8)
            top.legend(fontsize=7, title="fastvae vs", title_fontsize=7)
        top.set_title(op, fontsize=10)
        top.set_ylabel("speed-up (alternative time / fastvae time)" if column == 0 else "", fontsize=8)
        if _grouped_bars(bottom, cases, by_candidate, lambda r: r and r.get("floor_fraction") and
                         100 * r["floor_fraction"], log=False):
            bottom.legend(fontsize=7)
        else:
            bottom.text(0.5, 0.5, "no hardware floor for this op", ha="center", va="center",
                        transform=bottom.transAxes, fontsize=8)
        bottom.set_ylabel("% of the hardware floor" if column == 0 else "", fontsize=8)
    fig.suptitle(f"{bench} on {hardware}: fastvae speed-up (top) and fraction of the hardware floor (bottom)")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{bench}-{hardware}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def draw_vq_memory(hardware, records, out_dir):
    """Peak memory of ``vector_quantize`` against K, a line per candidate and (N, D, dtype);
    None where no record has a peak."""
    rows = [r for r in records if r["op"] == "vector_quantize" and r.get("peak_mib") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    lines = {}
    for r in rows:
        n, k, d = r["shape"]
        lines.setdefault((r["candidate"], (n, d, r["dtype"])), []).append((k, r["peak_mib"]))
    candidates = _unique(candidate for candidate, _ in sorted(lines))
    groups = _unique(group for _, group in sorted(lines))
    for (candidate, group), points in sorted(lines.items()):
        points.sort()
        ax.plot([k for k, _ in points], [m for _, m in points], color=f"C{candidates.index(candidate)}",
                marker="osD^v<>"[groups.index(group) % 7])
    # two legends: colour = candidate, marker = (N, D) of the run
    handles = [plt.Line2D([], [], color=f"C{i}", label=c) for i, c in enumerate(candidates)]
    handles += [plt.Line2D([], [], color="grey", linestyle="", marker="osD^v<>"[i % 7],
                           label=f"N={n} D={d}" + ("" if dtype == "float32" else f" {dtype}"))
                for i, (n, d, dtype) in enumerate(groups)]
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1.0)  # fastvae's peak is ~0: outputs only, no (N, K) matrix
    ax.set_ylim(bottom=0)
    ax.set_xlabel("codebook size K")
    ax.set_ylabel("peak memory above the start (MiB)")
    ax.set_title(f"vector_quantize forward on {hardware}: peak memory as K grows")
    ax.legend(handles=handles, fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, f"vq-memory-{hardware}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def draw(paths=None, out_dir=None):
    """Every figure from the result files ``paths`` (default: all of ``benchmarks/results/``)
    into ``out_dir`` (default ``benchmarks/results/figures/``); returns the PNG paths."""
    paths = paths or sorted(glob.glob(os.path.join(RESULTS, "*.json")))
    out_dir = out_dir or os.path.join(RESULTS, "figures")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (bench, hardware), records in sorted(load(paths).items()):
        written.append(draw_bench(bench, hardware, records, out_dir))
        if bench == "vq":
            written.append(draw_vq_memory(hardware, records, out_dir))
    return [path for path in written if path]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="result JSON files (default: every one in benchmarks/results/)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: benchmarks/results/figures/)")
    args = p.parse_args()
    for path in draw(args.files, args.out):
        print(path)


if __name__ == "__main__":
    main()
