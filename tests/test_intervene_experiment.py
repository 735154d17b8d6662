"""``scorescope intervene locality-sweep``: planning, resumable parts, refused folders and options, the table.

Runs the real edits (:mod:`interventions`) on the tiny random CLEVR model with n = 2 scenes, counts 1-2 and
2-3 DDIM steps; the units are counted by wrapping ``interventions.apply``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from typer.testing import CliRunner

import interventions as iv
from interp.clevr.evaluate import OptionError
from scorescope.experiments import locality_sweep as ls


class Counter:
    """``interventions.apply`` that counts the units it wraps and can interrupt the n-th one."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.entered = 0
        self.interrupt_at = interrupt_at

    @contextlib.contextmanager
    def __call__(self, unet: Any, *edits: Any):
        self.entered += 1
        if self.entered == self.interrupt_at:
            raise KeyboardInterrupt  # what Ctrl-C mid-sweep looks like to the loop
        with iv.apply(unet, *edits):
            yield


@pytest.fixture(scope="module")
def tiny_layers():
    from interp.models.registry import load_model

    return ls.attn2_layers(load_model("tiny-clevr").pipeline)


def small_plan() -> list[ls.Intervention]:
    return [
        ls.Intervention("unpatched", "reference"),
        ls.Intervention("mask:all:r0.15", "layer", "all", "all", 0.15, (iv.MaskCrossAttention("*attn2", radius=0.15),)),
        ls.Intervention("scores:r0.15", "baseline", "output", "all", 0.15, (iv.ComposeScores(0.15),)),
    ]


RUN = dict(counts="1-2", n=2, seed=0, steps=2, references=[], keep_images=2, figures=False)


def test_layers_are_in_execution_order_with_their_grids(tiny_layers):
    names = [layer.name for layer in tiny_layers]
    assert names == ["down1.0", "down2.0", "mid", "up0.0", "up0.1", "up1.0", "up1.1"]  # mid before up
    sides = {layer.name: layer.side for layer in tiny_layers}
    assert sides["down1.0"] > sides["down2.0"] and sides["up1.0"] == sides["down1.0"]


def test_plan_names_kinds_and_groups(tiny_layers):
    plan = ls.plan_interventions(tiny_layers, num_steps=25, radii=[0.15], references=["exp1", "exp3"])
    by = {i.name: i for i in plan}
    assert len(by) == len(plan)  # stable, unique names
    assert [i.name for i in plan[:3]] == ["unpatched", "ref:exp1", "ref:exp3"]
    assert {i.kind for i in plan[:3]} == {"reference"} and by["scores:r0.15"].kind == "baseline"
    assert all(i.kind == "layer" for i in plan if i.name.startswith(("mask", "compose")))
    # every layer alone, then the groups that are not a single layer (mid is one layer: no mask:mid group row twice)
    masks = [i.name for i in plan if i.name.startswith("mask:") and not i.name.endswith(":early")]
    assert masks == [f"mask:{n}:r0.15" for n in ("down1.0", "down2.0", "mid", "up0.0", "up0.1", "up1.0", "up1.1",
                                                 "down", "up", "lowres", "hires", "all")]
    assert by["mask:up:r0.15"].edits[0].sites == tuple(l.path for l in tiny_layers if l.path.startswith("up_blocks"))
    assert by["mask:all:r0.15"].edits[0].sites == ("*attn2",)
    assert isinstance(by["compose:up:r0.15"].edits[0], iv.Compose) and by["scores:r0.15"].edits[0].sites == ("output",)
    early = by["mask:up:r0.15:early"]
    assert list(early.edits[0].steps) == list(range(13)) and early.steps == "0-12"  # the high-noise half of 25 DDIM steps
    assert by["mask:up:r0.15"].edits[0].steps is None and by["mask:up:r0.15"].steps == "all"
    hires = by["mask:hires:r0.15"].sites.split(",")
    assert hires == ["down1.0", "up1.0", "up1.1"]  # the finest query grid
    # compose from L onward: L and every later layer in execution order; the first L is compose:all
    assert by["compose-from:up0.0:r0.15"].sites == "up0.0,up0.1,up1.0,up1.1"
    assert by["compose-from:mid:r0.15"].sites == "mid,up0.0,up0.1,up1.0,up1.1"
    assert "compose-from:down1.0:r0.15" not in by and by["compose:all:r0.15"].sites.startswith("down1.0,")
    two = ls.plan_interventions(tiny_layers, num_steps=25, radii=[0.1, 0.2])
    assert {"mask:up:r0.1", "mask:up:r0.2", "scores:r0.1", "scores:r0.2"} <= {i.name for i in two}


def test_only_selects_by_name_or_glob_and_refuses_typos(tiny_layers):
    plan = ls.plan_interventions(tiny_layers, num_steps=4)
    assert [i.name for i in ls.select(plan, "unpatched,scores:*")] == ["unpatched", "scores:r0.15"]
    with pytest.raises(ValueError, match="no intervention matches 'mask:upp:r0.15'.*mask:up:r0.15"):
        ls.select(plan, "mask:upp:r0.15")


def test_resume_after_interruption_recomputes_nothing(tmp_path):
    out = tmp_path / "sweep"
    first = Counter(interrupt_at=2)  # units: unpatched k=1, k=2 (no edit), mask k=1 (1st apply), mask k=2 (2nd: boom)
    with pytest.raises(KeyboardInterrupt):
        ls.run_locality_sweep("tiny-clevr", out=out, plan=small_plan(), apply=first, **RUN)
    done = sorted(p.name for p in (out / "parts").glob("*.json"))
    assert len(done) == 3 and len(ls.read_parts(out)) == 3  # partial results are readable
    again = Counter()
    res = ls.run_locality_sweep("tiny-clevr", out=out, plan=small_plan(), apply=again, **RUN)
    assert res.ran == [("mask:all:r0.15", 2), ("scores:r0.15", 1), ("scores:r0.15", 2)]
    assert len(res.skipped) == 3 and again.entered == 3
    third = Counter()
    res = ls.run_locality_sweep("tiny-clevr", out=out, plan=small_plan(), apply=third, **RUN)
    assert res.ran == [] and third.entered == 0 and len(res.frame) == 6
    # a wider request adds only the new units
    res = ls.run_locality_sweep("tiny-clevr", out=out, plan=small_plan(), apply=Counter(), **dict(RUN, counts="1-3"))
    assert [k for _, k in res.ran] == [3, 3, 3] and len(res.frame) == 9


def test_table_columns_kinds_files_and_json(tmp_path):
    out, js = tmp_path / "sweep", tmp_path / "summary.json"
    res = ls.run_locality_sweep("tiny-clevr", out=out, plan=small_plan(), apply=Counter(), json_path=js, **dict(RUN, counts="2", figures=True))
    df = res.frame
    assert tuple(df.columns) == ls.COLUMNS
    assert dict(zip(df.intervention, df.kind)) == {"unpatched": "reference", "mask:all:r0.15": "layer", "scores:r0.15": "baseline"}
    assert set(df.k) == {2} and (df.n == 2).all()
    for m in ("count_acc", "recall", "placement_acc"):
        assert ((df[f"{m}_lo"] <= df[m] + 1e-12) & (df[m] <= df[f"{m}_hi"] + 1e-12)).all()
    assert (out / "results.csv").read_text().splitlines()[0] == ",".join(ls.COLUMNS)
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    grids = sorted((out / "samples").glob("*.png"))
    assert len(grids) == 3 and grids[0].read_bytes()[:4] == b"\x89PNG"
    data = json.loads(js.read_text())
    assert {"settings", "rows", "machine", "wall_s", "interventions"} <= set(data)
    assert data["settings"]["n"] == 2 and len(data["rows"]) == 3
    assert data["interventions"][1]["edits"][0]["type"] == "MaskCrossAttention"


def test_changed_config_and_foreign_folder_are_refused(tmp_path):
    out = tmp_path / "sweep"
    ls.run_locality_sweep("tiny-clevr", out=out, plan=small_plan()[:1], apply=Counter(), **dict(RUN, counts="1"))
    with pytest.raises(OptionError, match=r"other settings \{'n': \(2, 3\)\}") as err:
        ls.run_locality_sweep("tiny-clevr", out=out, plan=small_plan()[:1], apply=Counter(), **dict(RUN, counts="1", n=3))
    assert err.value.option == "--out"
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        ls.run_locality_sweep("tiny-clevr", out=user, plan=small_plan()[:1], apply=Counter(), **RUN)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    from interp.io import prepare_output_dir

    other = prepare_output_dir(tmp_path / "probe-sweep", "locality-sweep")  # another command's folder
    (other / "sweep.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"another scorescope command \(locality-sweep\)"):
        ls.run_locality_sweep("tiny-clevr", out=other, plan=small_plan()[:1], apply=Counter(), **RUN)


def test_cli_refuses_bad_options_naming_them(tmp_path):
    from scorescope.cli import app

    base = ["intervene", "locality-sweep", "--model", "tiny-clevr", "--out", str(tmp_path / "s")]
    for extra, option, text in (
        (["--counts", "0-99"], "--counts", "outside 0…10"),
        (["--n", "0"], "--n", "n must be >= 1"),
        (["--radii", "0.1,-2"], "--radii", "radii must be finite numbers > 0"),
        (["--references", "exp42"], "--references", "unknown reference model"),
    ):
        res = CliRunner().invoke(app, base + extra)
        assert res.exit_code == 2 and f"'{option}'" in res.output and text in res.output, (extra, res.output)
    assert not (tmp_path / "s").exists()  # nothing claimed before the options were checked
    res = CliRunner().invoke(app, base + ["--list", "--only", "compose-from:*"])
    assert res.exit_code == 0 and "compose-from:mid:r0.15\tlayer\tmid,up0.0" in res.output
    assert not (tmp_path / "s").exists()  # --list runs nothing and writes nothing


def test_cli_runs_real_edits_end_to_end(tmp_path):
    from scorescope.cli import app

    out, js = tmp_path / "s", tmp_path / "s.json"
    args = ["intervene", "locality-sweep", "--model", "tiny-clevr", "--counts", "1-2", "--n", "2", "--steps", "3",
            "--out", str(out), "--json", str(js), "--only", "unpatched,mask:up:r0.15:early,compose-from:up1.0:*"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = json.loads(js.read_text())["rows"]
    assert [(r["intervention"], r["k"]) for r in rows] == [
        ("unpatched", 1), ("unpatched", 2), ("mask:up:r0.15:early", 1), ("mask:up:r0.15:early", 2),
        ("compose-from:up1.0:r0.15", 1), ("compose-from:up1.0:r0.15", 2)]
    assert rows[2]["steps"] == "0-1" and rows[4]["sites"] == "up1.0,up1.1"  # high-noise half of 3 steps
    assert (out / "from_layer.png").read_bytes()[:4] == b"\x89PNG"
    res = CliRunner().invoke(app, args)  # a rerun resumes: nothing is sampled again
    assert res.exit_code == 0 and "0 units run, 6 resumed" in res.output
    res = CliRunner().invoke(app, args[:-1] + ["mask:upp:*"])
    assert res.exit_code == 2 and "'--only'" in res.output and "mask:up" in res.output


def test_compose_block_family_composes_one_whole_block_each(tiny_layers):
    plan = ls.plan_interventions(tiny_layers, num_steps=25, radii=[0.15], blocks=["mid_block", "up_blocks.0", "up_blocks.1"])
    fam = {i.name: i for i in plan if i.name.startswith("compose-block:")}
    assert list(fam) == ["compose-block:mid_block:r0.15", "compose-block:up_blocks.0:r0.15", "compose-block:up_blocks.1:r0.15"]
    assert fam["compose-block:up_blocks.0:r0.15"].edits[0].sites == ("up_blocks.0",)
    assert all(i.kind == "layer" for i in fam.values())
    assert not [i for i in ls.plan_interventions(tiny_layers, num_steps=25) if i.name.startswith("compose-block")]
