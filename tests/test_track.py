"""``scorescope clevr track``: one unit per snapshot, resumable, refuses changed settings, deterministic."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from interp.clevr.train import SNAPSHOT_DIR, get_recipe, snapshot_folders, train
from scorescope.experiments import track as tr

# The cheapest measurement that still runs every probe: two counts, two scenes per count, two DDIM steps, one
# probe scene with two objects, one noise seed, two noise levels, one JVP direction.
CFG = tr.TrackConfig(counts=(1, 2), n=2, steps=2, probe_k=2, probe_scenes=1, probe_seeds=1, levels=(0.9, 0.5), directions=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-step exp1 run (16 × 16 images: the cheapest) with a snapshot after each step (module-scoped: tests copy it before changing it)."""
    run = tmp_path_factory.mktemp("track") / "run"
    train(get_recipe("exp1", steps=2, batch_size=2, checkpoint_every=2, size=16), run, seed=0, progress=False, snapshot_every=1)
    assert [s for s, _ in snapshot_folders(run)] == [1, 2]
    return run


MID, UP = tr.DEFAULT_SITES


def _rows_per_snapshot(cfg: tr.TrackConfig) -> dict[str, int]:
    probes = len(cfg.levels) * cfg.probe_scenes * cfg.probe_seeds
    return {"length": len(cfg.counts) * len(tr.LENGTH_METRICS), "locality": len(tr.LOCALITY_METRICS) * 2 * probes,
            "cpc": len(tr.CPC_METRICS) * probes}


def _done(result) -> list[tuple]:
    return [(u.label, u.step, u.site) for u in result.ran]


def test_one_unit_per_snapshot_resume_new_snapshot_and_site(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    out = tmp_path / "out"
    first = tr.run_track({"exp1": run}, out, CFG, sites=[MID])
    assert _done(first) == [("exp1", 1, None), ("exp1", 1, MID), ("exp1", 2, None), ("exp1", 2, MID)] and not first.skipped
    assert len(list((out / "parts").iterdir())) == 4
    df = first.frame
    want = _rows_per_snapshot(CFG)
    for step in (1, 2):
        got = df[(df.step == step) & (df.family != "feature")].family.value_counts().to_dict()
        assert got == want, (step, got)
        feat = df[(df.step == step) & (df.family == "feature")]
        assert set(feat.site) == {MID} and {"in_region", "n_eff", "channel_pr"} <= set(feat.metric)
        assert len(feat) == feat.metric.nunique() * len(CFG.levels) * CFG.probe_scenes * CFG.probe_seeds
    length = df[df.family == "length"]
    assert sorted(length.k.unique()) == [1, 2] and (length.n == 2).all()
    fr = length[length.metric.isin(["count_acc", "recall", "placement_acc"])]
    assert ((fr.lo <= fr.value) & (fr.value <= fr.hi)).all()  # Wilson intervals hold the estimate
    inr = df[(df.family == "locality") & (df.metric == "in_region")]
    assert set(inr.map_name) == {"jvp", "ablation"} and set(inr.t) == set(CFG.levels) and inr.value.between(0, 1).all()
    assert (out / "track.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["rows"]) == len(df) and summary["settings"]["n"] == CFG.n
    assert sorted((w["step"], w["site"] or "") for w in summary["unit_wall_s"]) == [(1, ""), (1, MID), (2, ""), (2, MID)]
    assert (out / "results.csv").read_text().splitlines()[0] == ",".join(tr.COLUMNS)
    # different weights give different numbers (so the equalities below can fail)
    a = df[df.step == 1].reset_index(drop=True).value
    b = df[df.step == 2].reset_index(drop=True).value
    assert not a.equals(b)

    # the CLI with the same settings computes nothing new
    res = _cli(["--run", f"exp1={run}", "--out", str(out), "--counts", "1,2", "--n", "2", "--steps", "2", "--probe-k", "2",
                "--probe-scenes", "1", "--probe-seeds", "1", "--levels", "0.9,0.5", "--directions", "1", "--sites", MID])
    assert "0 units run, 4 resumed" in res
    assert tr.read_parts(out).equals(df)

    # a new snapshot appears (the weights of step 2, as step 3) and a site is added: only those units run, and a
    # fresh load of the same weights with the same seed gives exactly the same numbers
    shutil.copytree(run / SNAPSHOT_DIR / "step-0000002", run / SNAPSHOT_DIR / "step-0000003")
    listed = _cli(["--run", f"exp1={run}", "--out", str(out), "--sites", f"{MID},{UP}", "--list"])
    assert "todo\texp1 step 3\n" in listed and "done\texp1 step 2\n" in listed and f"todo\texp1 step 1 site {UP}" in listed
    assert "5 of 9 units still to do" in listed
    coarse = _cli(["--run", f"exp1={run}", "--out", str(out), "--sites", "none", "--every", "2", "--list"])
    assert coarse.count("\texp1 step") == 1 and "done\texp1 step 2\n" in coarse and "0 of 1 units still to do" in coarse
    third = tr.run_track({"exp1": run}, out, CFG, sites=[MID, UP])
    assert sorted(_done(third), key=str) == sorted([("exp1", 1, UP), ("exp1", 2, UP), ("exp1", 3, None), ("exp1", 3, MID),
                                                    ("exp1", 3, UP)], key=str)
    assert len(third.skipped) == 4
    f = third.frame
    cols = [c for c in tr.COLUMNS if c != "step"]
    s2 = f[f.step == 2][cols].reset_index(drop=True)
    s3 = f[f.step == 3][cols].reset_index(drop=True)
    assert len(s3) > len(df[df.step == 2]) and s2.equals(s3)

    # the weights of a measured snapshot change (the run was trained again): refused, not mixed
    shutil.rmtree(run / SNAPSHOT_DIR / "step-0000003")
    shutil.copytree(run / SNAPSHOT_DIR / "step-0000001", run / SNAPSHOT_DIR / "step-0000003")
    with pytest.raises(tr.TrackError, match="step 3.*differ"):
        tr.run_track({"exp1": run}, out, CFG, sites=[MID, UP])


def _cli(args: list[str]) -> str:
    from scorescope.cli import app

    res = CliRunner().invoke(app, ["clevr", "track", *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_changed_settings_and_relabelled_runs_are_refused(run_dir, tmp_path):
    out = tmp_path / "out"
    tr.prepare(out, tr.check_config(CFG), {"exp1": run_dir})
    with pytest.raises(tr.TrackError, match=r"'n': \(2, 3\)") as err:
        tr.run_track({"exp1": run_dir}, out, tr.TrackConfig(**{**CFG.__dict__, "n": 3}))
    assert err.value.option == "--out"
    with pytest.raises(tr.TrackError, match=r"'levels'"):
        tr.run_track({"exp1": run_dir}, out, tr.TrackConfig(**{**CFG.__dict__, "levels": (0.9,)}))
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    with pytest.raises(tr.TrackError, match="label 'exp1' measured"):
        tr.run_track({"exp1": other}, out, CFG)
    # a foreign non-empty folder is refused, and nothing was written into it
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(tr.TrackError, match="--overwrite"):
        tr.run_track({"exp1": run_dir}, foreign, CFG)
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--run", "{missing}"], "not a folder"),
        (["--run", "{empty}"], "no snapshots"),
        (["--run", "bad label={run}"], "LABEL=FOLDER"),
        (["--run", "=x"], "LABEL=FOLDER"),
        (["--run", "a={run}", "--run", "a={run}"], "twice"),
        (["--run", "{run}", "--counts", "6-4"], "reversed"),
        (["--run", "{run}", "--counts", "4,x"], "cannot parse counts"),
        (["--run", "{run}", "--n", "0"], "--n"),
        (["--run", "{run}", "--levels", "0.9,1.5"], "--levels"),
        (["--run", "{run}", "--probe-seeds", "0"], "--probe-seeds"),
        (["--run", "{run}", "--every", "0"], "--every"),
    ],
)
def test_cli_refuses_bad_input_with_exit_2(run_dir, tmp_path, args, needle):
    from scorescope.cli import app

    (tmp_path / "empty").mkdir()
    subs = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "run": run_dir}
    argv = [a.format(**subs) for a in args]
    res = CliRunner().invoke(app, ["clevr", "track", *argv, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert needle in re.sub(r"[\s│╭╮╰╯─]+", " ", res.output)  # rich wraps the message in a box
    assert not (tmp_path / "out").exists()  # refused before anything was written
