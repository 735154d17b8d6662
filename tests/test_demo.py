"""`scorescope demo` runs end to end and writes what it says it writes."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from scorescope.cli import app
from interp.store import open_store


def test_demo_end_to_end_on_its_default_model(tmp_path):
    """The demo as `make demo` runs it: no --model, so the README's promise (the shipped exp1) is what is tested."""
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    for name in ("capture.csv", "pixel_locality.csv", "pixel_locality.png", "conditional_locality.csv",
                 "conditional_locality.png", "sdxl_capture.csv", "sample.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "exp1" and summary["seed"] == 3
    assert summary["model_class"] == "CoordUNet2DConditionModel"  # the shipped checkpoint, not the tiny random model
    store = open_store(out / "activations")
    assert len(store) == len(pd.read_csv(out / "capture.csv")) == 7 * 20  # 7 attn2 modules x 20 steps
    pix = pd.read_csv(out / "pixel_locality.csv")
    assert {"model", "t", "metric", "value"} <= set(pix.columns) and set(pix.t) == {0.1, 0.5, 0.9}
    sd = pd.read_csv(out / "sdxl_capture.csv")
    assert set(sd.branch) == {"uncond", "cond"} and sorted(sd.step.unique()) == [0, 1, 2]


def test_demo_refuses_a_foreign_folder_and_keeps_its_files(tmp_path):
    out = tmp_path / "mine"
    (out / "activations").mkdir(parents=True)
    (out / "activations" / "notes.txt").write_text("my notes")
    (out / "summary.json").write_text("my summary")
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--model", "tiny-clevr"])
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert (out / "activations" / "notes.txt").read_text() == "my notes"
    assert (out / "summary.json").read_text() == "my summary"


def test_demo_overwrite_writes_its_files_and_deletes_nothing_else(tmp_path):
    out = tmp_path / "mine"
    (out / "activations").mkdir(parents=True)
    (out / "activations" / "notes.txt").write_text("my notes")
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--model", "tiny-clevr", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "activations" / "notes.txt").read_text() == "my notes"
    assert len(open_store(out / "activations")) == 7 * 20
