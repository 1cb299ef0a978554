"""Each example (examples/*.py) trains a few steps with tiny settings, with fastvae and with
its textbook --reference: the training loss falls and the PNGs and metrics are written."""
import json
import os
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

RUNS = [("vae", []), ("vae", ["--beta", "4"]), ("vae", ["--conditional"]), ("vqvae", []),
        ("vqvae", ["--residual", "2"]), ("dvae", []), ("dvae", ["--hard"]),
        ("vae", ["--reference"]), ("vqvae", ["--residual", "2", "--reference"]), ("dvae", ["--reference"])]


@pytest.mark.parametrize("example,flags", RUNS, ids=[" ".join([name, *flags]) for name, flags in RUNS])
def test_example_trains(example, flags, tmp_path):
    module = __import__(example)
    steps = 40
    metrics = module.main([*flags, "--steps", str(steps), "--batch-size", "50", "--lr", "3e-3", "--no-progress",
                           "--out", str(tmp_path)])
    assert metrics["steps"] == steps
    assert metrics["final_loss"] < 0.95 * metrics["first_loss"], metrics
    for png in ["reconstructions.png", "samples.png"] + (["codebook-usage.png"] if example == "vqvae" else []):
        assert (tmp_path / png).stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["final_loss"] == metrics["final_loss"]
