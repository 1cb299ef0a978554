"""The benchmark outputs: the harness's suites and its run over cases (JSON written), and
the figure code (benchmarks/plots.py) on a small results file."""
import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import harness  # noqa: E402


def _record(op, mode, shape, candidate, ms, speedup=None, floor=None, peak=None):
    record = {"op": op, "mode": mode, "shape": list(shape), "dtype": "float32", "device": "cpu",
              "candidate": candidate, "median_ms": ms, "floor_fraction": floor, "fastvae_speedup": speedup}
    if peak is not None:
        record["peak_mib"] = peak
    return record


def _results_file(path, bench, records, date="2026-12-01"):
    path.write_text(json.dumps({"bench": bench, "suite": "default", "environment": {"date": date, "cpu": "test"},
                                "records": records}))
    return str(path)


def test_suites_pick_shapes():
    full, representative = [(1,), (2,), (3,)], [(2,)]
    for flags, expected in [([], representative), (["--full"], full), (["--quick"], full[:1]),
                            (["--device", "cuda"], full), (["--device", "cuda", "--quick"], full[:1])]:
        assert harness.shapes(harness.parser("").parse_args(flags), full, representative) == expected, flags


def test_run_benches_times_every_case_and_writes_json(tmp_path):
    def cases(args):
        for n in (4, 8):
            yield harness.Case("toy", (n,), {"fastvae[x]": lambda: None, "torch eager": lambda: sum(range(50))},
                               bytes_moved=16 * n)

    args = harness.parser("").parse_args(["--samples", "3", "--out", str(tmp_path / "toy.json")])
    paths, failed = harness.run_benches([("toy", cases)], args)
    assert not failed
    data = json.loads(open(paths["toy"]).read())
    assert data["bench"] == "toy" and data["suite"] == "default"
    assert [(r["shape"], r["candidate"]) for r in data["records"]] == [
        ([4], "fastvae[x]"), ([4], "torch eager"), ([8], "fastvae[x]"), ([8], "torch eager")]


@pytest.mark.parametrize("folder", ["existing", "new/"])
def test_out_names_a_folder_for_the_default_file_name(tmp_path, folder):
    def cases(args):
        yield harness.Case("toy", (4,), {"fastvae[x]": lambda: None, "torch eager": lambda: None})

    out = os.path.join(str(tmp_path), folder)  # (a pathlib path would drop the trailing /)
    if folder == "existing":
        os.mkdir(out)
    args = harness.parser("").parse_args(["--samples", "3", "--out", out])
    paths, failed = harness.run_benches([("toy", cases)], args)
    assert not failed and os.path.dirname(paths["toy"]) == out.rstrip("/")
    assert os.path.basename(paths["toy"]).startswith("toy-cpu-default-")
    assert json.loads(open(paths["toy"]).read())["bench"] == "toy"


def test_only_and_targets(tmp_path, capsys):
    def cases(args):
        for op in ("toy soft", "toy hard"):
            yield harness.Case(op, (4,), {"fastvae[x]": lambda: None, "torch eager": lambda: sum(range(500))},
                               targets=[("torch eager", 1e9, "an unreachable speed-up"), ("torch eager", 1.0, "any")])

    args = harness.parser("").parse_args(["--samples", "3", "--only", "hard", "--out", str(tmp_path / "toy.json")])
    paths, failed = harness.run_benches([("toy", cases)], args)
    records = json.loads(open(paths["toy"]).read())["records"]
    assert not failed and {r["op"] for r in records} == {"toy hard"}
    assert "target: an unreachable speed-up: not met" in capsys.readouterr().out


def test_figures_from_a_results_file(tmp_path):
    pytest.importorskip("matplotlib")
    import plots

    records = []
    for shape in [(256, 64), (4096, 512)]:
        for mode in ("forward", "forward+backward"):
            records += [_record("gumbel_softmax", mode, shape, "fastvae[native]", 1.0, floor=0.5),
                        _record("gumbel_softmax", mode, shape, "torch eager", 4.0, speedup=4.0, floor=0.12),
                        _record("gumbel_softmax", mode, shape, "torch.compile", 2.0, speedup=2.0, floor=0.25)]
    vq = []
    for k in (1024, 2048, 4096):
        vq += [_record("vector_quantize", "forward", (16384, k, 32), "fastvae[native]", 1.0, floor=0.9, peak=0.0),
               _record("vector_quantize", "forward", (16384, k, 32), "eager VQ layer", 2.0, 2.0, 0.45, k / 16),
               _record("vector_quantize", "forward", (16384, k, 32), "vector-quantize-pytorch", 8.0, 8.0, 0.1, k / 4)]
    # an older file with the same case: the newer one's record is drawn
    older = [_record("gumbel_softmax", "forward", (256, 64), "torch eager", 40.0, speedup=40.0, floor=0.01)]
    files = [_results_file(tmp_path / "gumbel.json", "gumbel", records),
             _results_file(tmp_path / "old.json", "gumbel", older, date="2026-11-01"),
             _results_file(tmp_path / "vq.json", "vq", vq),
             # bench_distributed's own kind of record: not drawn, and no failure
             _results_file(tmp_path / "distributed.json", "distributed",
                           [{"op": "VectorQuantizer", "shape": [32768, 256], "sync_ms": 68.0}])]
    assert [r["median_ms"] for r in plots.load(files)[("gumbel", "cpu")]
            if r["candidate"] == "torch eager" and r["shape"] == [256, 64] and r["mode"] == "forward"] == [4.0]
    written = plots.draw(files, str(tmp_path / "figures"))
    assert sorted(os.path.basename(p) for p in written) == ["gumbel-cpu.png", "vq-cpu.png", "vq-memory-cpu.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
