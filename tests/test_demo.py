"""`scorescope demo` runs end to end and writes what it says it writes."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from scorescope.cli import app
from interp.store import open_store


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--model", "tiny-clevr", "--seed", "3"])
    assert result.exit_code == 0, result.output
    for name in ("capture.csv", "pixel_locality.csv", "pixel_locality.png", "conditional_locality.csv",
                 "conditional_locality.png", "sdxl_capture.csv", "sample.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny-clevr" and summary["seed"] == 3
    store = open_store(out / "activations")
    assert len(store) == len(pd.read_csv(out / "capture.csv")) == 7 * 20  # 7 attn2 modules x 20 steps
    pix = pd.read_csv(out / "pixel_locality.csv")
    assert {"model", "t", "metric", "value"} <= set(pix.columns) and set(pix.t) == {0.1, 0.5, 0.9}
    sd = pd.read_csv(out / "sdxl_capture.csv")
    assert set(sd.branch) == {"uncond", "cond"} and sorted(sd.step.unique()) == [0, 1, 2]
