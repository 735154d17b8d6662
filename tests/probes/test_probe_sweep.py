"""Sweeps: tidy rows, atomic parts, resume after an interruption without recomputing or duplicating."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import probes.sweep as sweep_mod
from probes import ProbeResult, locality_sweep, read_sweep
from probes.cli import app

KEY = ["site", "t", "seed", "metric", "conditioner", "map_name"]


def _sweep(den, cond, out, **kw):
    return locality_sweep(den, cond, sites=["output", "inject"], t=[0.2, 0.8], seeds=[0, 1], out=out,
                          directions=2, radius=0.2, dtype=torch.float64, **kw)


def test_sweep_resumes_after_interruption_without_duplicates(local_den, toy_cond, tmp_path, monkeypatch):
    reference = _sweep(local_den, toy_cond, None)
    assert set(reference.site) == {"output", "inject"} and len(reference.groupby(["site", "t", "seed"])) == 8
    assert not reference.duplicated(KEY).any()

    real = sweep_mod.run_unit
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed mid-sweep")
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "run_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        _sweep(local_den, toy_cond, tmp_path)
    partial = read_sweep(tmp_path)
    assert partial["unit"].nunique() == 4 and not (tmp_path / "results.csv").exists()
    assert not list((tmp_path / "parts").glob(".*.tmp"))  # nothing half-written

    calls["n"] = 100  # no more failures; count what is recomputed
    done = _sweep(local_den, toy_cond, tmp_path)
    assert calls["n"] == 104  # only the 4 missing units ran
    assert not done.duplicated(KEY).any() and len(done) == len(reference)
    on_disk = pd.read_csv(tmp_path / "results.csv")
    assert len(on_disk) == len(reference)
    a = done.sort_values(KEY).reset_index(drop=True)
    b = reference.sort_values(KEY).reset_index(drop=True)
    pd.testing.assert_series_equal(a["value"], b["value"], check_exact=False, rtol=1e-9)
    calls["n"] = 200
    _sweep(local_den, toy_cond, tmp_path)
    assert calls["n"] == 200  # a finished sweep recomputes nothing
    with pytest.raises(ValueError, match="different settings"):
        locality_sweep(local_den, toy_cond, sites="output", t=[0.2], seeds=1, out=tmp_path, radius=0.3, dtype=torch.float64)


def test_sweep_rows_are_tidy(local_den, toy_cond):
    df = locality_sweep(local_den, toy_cond, sites="output", t=[0.5], seeds=1, metrics=("cond", "cpc", "pixel"),
                        pixel_stride=6, directions=2, dtype=torch.float64)
    assert list(df.columns[:6]) == ["model", "site", "t", "metric", "value", "seed"]
    assert {"in_region", "cpc_residual", "side_50", "participation_ratio"} <= set(df.metric)
    assert (df.model == "toy-local").all()
    from interp import Denoiser

    guided = Denoiser(local_den.unet, guidance_scale=2.0, name="toy-local")
    both = locality_sweep(guided, toy_cond, sites="output", t=[0.5], seeds=1, branches=("cond", "guided"), directions=2,
                          dtype=torch.float64)
    assert set(both.branch) == {"cond", "guided"}
    inr = both[both.metric == "in_region"]
    assert (inr.value >= 1 - 1e-6).all() and len(inr) == 2 * 2 * 2  # 2 branches x 2 conditioners x (jvp, ablation)
    with pytest.raises(ValueError, match="metrics"):
        locality_sweep(local_den, toy_cond, metrics=("bogus",))
    with pytest.raises(Exception, match="Closest real paths"):
        locality_sweep(local_den, toy_cond, sites="injekt", t=[0.5], seeds=1)


def test_result_frame_and_json(tmp_path):
    r = ProbeResult("demo", maps={"m": torch.ones(2, 3)}, axes={"m": ("a", "b")}, metadata={"model": "x", "site": "output", "seeds": [0]})
    r.add("score", 0.5, t=0.1, seed=0)
    df = r.frame()
    assert list(df.columns[:6]) == ["model", "site", "t", "metric", "value", "seed"] and df.value.item() == 0.5
    data = json.loads(r.save_json(tmp_path / "r.json").read_text())
    assert data["maps"]["m"] == [[1.0] * 3] * 2 and data["metadata"]["seeds"] == [0]


def test_cli_commands(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["pixel", "--model", "tiny-clevr", "--t", "0.5", "--seeds", "1", "--pixels", "center",
                              "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["probe"] == "pixel_locality" and len(data["maps"]["G"][0][0]) == 32
    res = runner.invoke(app, ["cpc", "--model", "tiny-clevr", "--t", "0.9", "--seeds", "1", "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    assert any(row["metric"] == "cpc_residual" for row in json.loads((tmp_path / "c.json").read_text())["rows"])
    res = runner.invoke(app, ["cond", "--model", "tiny-clevr", "--t", "0.9", "--seeds", "1", "--directions", "1",
                              "--maps", "jvp", "--locations", "0.3,0.3;0.7,0.7", "--json", str(tmp_path / "j.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "j.json").read_text())["metadata"]["k"] == 2
    res = runner.invoke(app, ["sweep", "--model", "tiny-clevr", "--sites", "mid_block.attentions.0.transformer_blocks.0.attn2",
                              "--t", "0.5", "--seeds", "1", "--directions", "1", "--out", str(tmp_path / "sw")])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "sw" / "results.csv")
    assert (df.site == "mid_block.attentions.0.transformer_blocks.0.attn2").all() and (df.model == "tiny-clevr").all()
