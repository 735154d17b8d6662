"""`scorescope demo` runs end to end, as `make demo` runs it, and writes what its report says it wrote."""

from __future__ import annotations

import base64
import json
import re

import pandas as pd
from typer.testing import CliRunner

from scorescope.cli import app
from scorescope.demo import FULL, QUICK, STUDY_MODELS
from interp.store import open_store


def _figures_named(report_md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_md)


def test_demo_end_to_end_on_its_default_model(tmp_path):
    """The demo as a user runs it: no --model, so the README's promise (the shipped exp1) is what is tested;
    --quick keeps it fast and still runs every stage on the shipped checkpoints."""
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--seed", "3", "--quick"])
    assert result.exit_code == 0, result.output
    assert "%|" not in result.stderr and "it/s" not in result.stderr  # no progress bars when stderr is not a terminal
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "exp1" and summary["seed"] == 3 and summary["plan"] == "quick"
    assert summary["model_class"] == "CoordUNet2DConditionModel"  # the shipped checkpoint, not the tiny random model
    assert set(summary["stage_seconds"]) == {"capture", "locality maps", "locality by model", "length generalisation",
                                              "layer profile", "intervention", "report"}
    # the capture part the README describes: every attn2 output of every step, streamed
    store = open_store(out / "activations")
    assert len(store) == len(pd.read_csv(out / "capture.csv")) == 7 * QUICK.capture_steps  # 7 attn2 modules
    sd = pd.read_csv(out / "sdxl_capture.csv")
    assert set(sd.branch) == {"uncond", "cond"} and sorted(sd.step.unique()) == [0, 1, 2]
    # the study's tables
    length = pd.read_csv(out / "length.csv")
    assert set(length.model) == set(STUDY_MODELS) and set(length.k) == set(QUICK.counts)
    assert {"recall", "count_acc", "placement_acc", "mean_extra"} <= set(length.metric)
    assert length.query("metric == 'recall'").value.between(0, 1).all()
    by_model = pd.read_csv(out / "locality_by_model.csv")
    assert set(by_model.model) == set(STUDY_MODELS) and set(by_model.t) == set(QUICK.levels)
    exp3 = by_model.query("model == 'exp3' and metric == 'in_region'").value
    assert (exp3 > 0.99).all()  # exp3 is local by construction: its conditioners act only inside their discs
    profile = pd.read_csv(out / "profile.csv")
    assert set(profile.model) == set(QUICK.profile_models) and "in_region" in set(profile.metric)
    inter = pd.read_csv(out / "intervention.csv")
    assert list(inter.intervention) == ["exp2 unpatched", *[f"exp2 + {o}" for o in QUICK.sweep_only],
                                        "exp1 (reference)", "exp3 (reference)"]
    # the unpatched exp2 row is the length table's own number
    assert inter.recall.iloc[0] == length.query("model == 'exp2' and metric == 'recall' and k == @QUICK.sweep_counts[0]").value.item()
    # the report names every figure, each exists, and the HTML embeds each one (self-contained)
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    figures = _figures_named(md)
    assert len(figures) == 13
    for rel in figures:
        blob = (out / rel).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n", rel
        assert base64.b64encode(blob).decode() in html, rel
    assert "<img" in html and 'src="figures/' not in html and "src=\"maps/" not in html
    for number in ("Recall at k = 4", "In-region fraction at t = 0.9", "CPC residual at t = 0.9"):
        assert number in md, number
    # the numbers the report states are the tables' numbers
    recall = summary["headline"]["length"]["recall"]
    assert set(recall) == set(STUDY_MODELS)
    assert f"exp2 {recall['exp2']:.2f}" in md
    # exported maps open with their sidecars
    for stem in ("pixel_locality-G", "conditional_locality-jvp", "cpc_residual-residual"):
        assert (out / "maps" / f"{stem}.png").stat().st_size > 0
        assert json.loads((out / "maps" / f"{stem}.json").read_text())["provenance"]["model"] == "exp1"


def test_full_plan_is_the_study_the_readme_describes():
    """The README's quickstart states the default plan's sizes; the quick run above exercises the same code."""
    assert FULL.counts == (1, 3, 6, 8) and FULL.n == 16 and FULL.steps == 25
    assert FULL.levels == (0.1, 0.5, 0.9) and FULL.profile_sites == "*attn2" and FULL.profile_models == ("exp1", "exp2")
    assert FULL.sweep_counts == (6,) and FULL.sweep_only == ("mask:up0.1:r0.15", "compose-block:up_blocks.2:r0.15")
    assert set(FULL.formats) == {"png", "pdf", "svg"} and FULL.capture_steps == 20
    assert QUICK.sweep_only == FULL.sweep_only and QUICK.profile_models == FULL.profile_models


def test_demo_refuses_a_foreign_folder_and_keeps_its_files(tmp_path):
    out = tmp_path / "mine"
    (out / "activations").mkdir(parents=True)
    (out / "activations" / "notes.txt").write_text("my notes")
    (out / "summary.json").write_text("my summary")
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--model", "tiny-clevr", "--quick"])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "activations" / "notes.txt").read_text() == "my notes"
    assert (out / "summary.json").read_text() == "my summary"


def test_demo_overwrite_writes_its_files_and_deletes_nothing_else(tmp_path):
    out = tmp_path / "mine"
    (out / "activations").mkdir(parents=True)
    (out / "activations" / "notes.txt").write_text("my notes")
    (out / "figures").mkdir()
    (out / "figures" / "mine.png").write_bytes(b"not a figure of the demo")
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--model", "tiny-clevr", "--quick", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "activations" / "notes.txt").read_text() == "my notes"
    assert (out / "figures" / "mine.png").read_bytes() == b"not a figure of the demo"
    assert len(open_store(out / "activations")) == 7 * QUICK.capture_steps
    assert json.loads((out / "summary.json").read_text())["model"] == "tiny-clevr"
    assert (out / "report.html").stat().st_size > 0
    # the folder is now the demo's own: a rerun needs no --overwrite, and the sub-experiments resume (no part redone)
    parts = sorted(p for p in (out / "work").rglob("*") if p.is_file() and ("parts" in p.parts or p.suffix == ".safetensors"))
    assert len(parts) >= 3 * len(QUICK.counts) + len(QUICK.sweep_only)  # length batches + sweep units (+ profile)
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--model", "tiny-clevr", "--quick"])
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in parts} == stamps


def test_progress_bars_draw_when_asked_and_count_finished_units(capsys):
    """On a terminal (or progress=True) each sub-experiment's bar advances once per finished unit, with an ETA."""
    from scorescope.demo import _bar

    with _bar(2, "length generalisation", True) as tick:
        tick("done k=1 scenes 0…")
        tick("skip k=3 (done)")  # a resumed unit is not new work
        tick("done k=3 scenes 0…")
    err = capsys.readouterr().err
    assert "length generalisation" in err and "1/2" in err and "2/2" in err and "3/2" not in err
    assert "<" in err  # tqdm's "elapsed<remaining" (the ETA)
    with _bar(2, "silent", False) as tick:
        tick("done x")
    assert capsys.readouterr().err == ""


def test_a_bad_model_is_one_line_and_claims_no_folder(tmp_path):
    out = tmp_path / "d"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--model", "no-such-model", "--quick"])
    assert result.exit_code == 2 and "'--model'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()  # checked before the folder is claimed
