"""The CLEVR commands never delete or rewrite what they did not create, and refuse bad input before working.

Each test plants a user's file or a bad option and checks that it is refused early (before any training or
sampling) or left byte-for-byte intact. All of them failed on the code before these fixes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat

import pytest
from typer.testing import CliRunner

from interp.clevr.cli import app
from interp.clevr.train import LOG_HEADER, RecipeError, get_recipe, latest_checkpoint, train
from interp.io import MARKER

TINY = dict(batch_size=2, checkpoint_every=1)


def _plain(output: str) -> str:
    """CLI output without the rich error box and its line wrapping."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


def _plant(folder, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _unchanged(folder, files: dict[str, str]) -> bool:
    return all((folder / name).read_text() == text for name, text in files.items())


# --------------------------------------------------------------------------- clevr train: the run folder
def test_train_refuses_a_foreign_folder_and_never_replaces_its_files(tmp_path):
    """A user's folder with a loss.csv and a pipeline/: refused without --overwrite, and still with it."""
    run = tmp_path / "R"
    user = {"loss.csv": "epoch,acc\n1,0.5\n2,0.7\n", "pipeline/notes.txt": "mine", "latest.json": "{}"}
    _plant(run, user)
    rec = get_recipe("exp3", steps=1, **TINY)
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(rec, run, progress=False)
    with pytest.raises(FileExistsError, match="latest.json, loss.csv, pipeline"):
        train(rec, run, progress=False, overwrite=True)
    assert _unchanged(run, user)
    assert sorted(p.name for p in run.iterdir()) == ["latest.json", "loss.csv", "pipeline"]  # nothing added either

    res = CliRunner().invoke(app, ["train", "--recipe", "exp3", "--out", str(run), "--steps", "1", "--overwrite"])
    assert res.exit_code != 0 and "'--out'" in res.output and "loss.csv" in _plain(res.output)
    assert res.exception is None or isinstance(res.exception, SystemExit)  # one clean line, no traceback
    assert _unchanged(run, user)


def test_overwrite_trains_beside_a_users_files_and_prunes_only_its_own_checkpoints(tmp_path):
    run = tmp_path / "R"
    user = {
        "notes.txt": "keep me",
        "ckpt-mine/weights.bin": "user checkpoint",  # not one of ours: never pruned
        ".tmp-ckpt-0000002/x": "a user's folder with the name the old code used for its temporary checkpoints",
        "pipeline.tmp/x": "a user's folder with the name the old code used for its temporary export",
        "latest.json.tmp": "a user's file",
    }
    _plant(run, user)
    rec = get_recipe("exp3", steps=3, **TINY)
    res = train(rec, run, progress=False, overwrite=True)
    assert res.step == 3 and (run / "pipeline" / "model_index.json").is_file()
    assert _unchanged(run, user)
    assert json.loads((run / MARKER).read_text())["kind"] == "clevr-train"
    assert sorted(p.name for p in run.glob("ckpt-0*")) == ["ckpt-0000002", "ckpt-0000003"]  # keep=2 pruned step 1
    planted = {name.split("/")[0] for name in user}
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp") and p.name not in planted]  # no leftovers
    # checkpoints and the export get an ordinary folder's permissions, not mkdtemp's 0o700
    mask = os.umask(0o022)
    os.umask(mask)
    for folder in (latest_checkpoint(run), run / "pipeline"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask

    # Now ours: resumable without --overwrite; also when the marker is missing (runs made before it existed).
    (run / MARKER).unlink()
    assert train(get_recipe("exp3", steps=4, **TINY), run, progress=False).step == 4
    assert (run / MARKER).is_file() and _unchanged(run, user)
    rows = list(csv.DictReader((run / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    # Fewer steps than the checkpoint would export step-4 weights labelled as a 2-step run: refused.
    with pytest.raises(ValueError, match="already at step 4"):
        train(get_recipe("exp3", steps=2, **TINY), run, progress=False)


def test_a_folder_with_an_unreadable_checkpoint_is_not_taken_for_ours(tmp_path):
    run = tmp_path / "R"
    user = {"latest.json": json.dumps({"checkpoint": "ckpt-0000002"}), "ckpt-0000002/state.json": "not json"}
    _plant(run, user)
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(get_recipe("exp3", steps=1, **TINY), run, progress=False)
    assert _unchanged(run, user)


def test_a_missing_checkpoint_is_reported_not_silently_restarted(tmp_path):
    """Our run whose latest.json points at a deleted checkpoint: resuming from step 0 would be wrong."""
    run = tmp_path / "R"
    _plant(run, {MARKER: json.dumps({"kind": "clevr-train"}), "latest.json": json.dumps({"checkpoint": "ckpt-0000004", "step": 4})})
    with pytest.raises(FileNotFoundError, match="ckpt-0000004.*--fresh"):
        train(get_recipe("exp3", steps=5, **TINY), run, progress=False)
    assert not (run / "loss.csv").exists()


def test_a_foreign_pipeline_folder_in_our_run_is_refused_before_training(tmp_path):
    run = tmp_path / "R"
    _plant(run, {MARKER: json.dumps({"kind": "clevr-train"}), "pipeline/mine.txt": "user"})
    with pytest.raises(FileExistsError, match="pipeline"):
        train(get_recipe("exp3", steps=1, **TINY), run, progress=False)
    assert (run / "pipeline" / "mine.txt").read_text() == "user" and not (run / "loss.csv").exists()


@pytest.mark.parametrize("left", ["", "step,loss,lr,wall_s\r\n0,0.5,1.000e-05,0.10\r\n1,0.4"])
def test_a_kill_before_the_first_checkpoint_leaves_a_log_with_its_header(tmp_path, left):
    """As a kill leaves it: our marker and a loss.csv that is empty (header not flushed) or ends mid-row."""
    run = tmp_path / "R"
    _plant(run, {MARKER: json.dumps({"kind": "clevr-train"}), "loss.csv": left})
    train(get_recipe("exp3", steps=2, **TINY), run, progress=False)
    with (run / "loss.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == LOG_HEADER
    assert [int(r[0]) for r in rows[1:]] == [0, 1]


# --------------------------------------------------------------------------- recipe overrides
@pytest.mark.parametrize(
    "field, value",
    [("steps", -5), ("steps", 0), ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")), ("ema_decay", 1.0),
     ("ema_decay", -0.1), ("checkpoint_every", 0), ("warmup", -1), ("p_uncond", 1.5)],
)
def test_nonsensical_recipe_overrides_are_refused_naming_the_option(field, value):
    with pytest.raises(RecipeError, match=f"--{field.replace('_', '-')}") as err:
        get_recipe("exp1", **{field: value})
    assert err.value.option == f"--{field.replace('_', '-')}"


@pytest.mark.parametrize(
    "args, option",
    [(["--steps", "-5"], "--steps"), (["--batch-size", "0"], "--batch-size"), (["--lr", "-1"], "--lr"),
     (["--ema-decay", "1"], "--ema-decay"), (["--seed", "-1"], "--seed"), (["--threads", "0"], "--threads"),
     (["--profile", "tpu"], "--profile")],
)
def test_cli_train_refuses_bad_options_before_touching_the_folder(tmp_path, args, option):
    out = tmp_path / "R"
    res = CliRunner().invoke(app, ["train", "--recipe", "exp3", "--out", str(out), *args])
    assert res.exit_code == 2, res.output  # a usage error, not a crash or a run
    assert f"'{option}'" in res.output
    assert not out.exists()


# --------------------------------------------------------------------------- clevr eval / render / compare
@pytest.fixture()
def no_sampling(monkeypatch):
    """Make any evaluation fail the test: the checks below must happen before sampling."""
    import interp.clevr.evaluate as ev

    def forbidden(*args, **kwargs):
        raise AssertionError("the evaluation ran before the bad option was refused")

    monkeypatch.setattr(ev, "evaluate_length", forbidden)


@pytest.mark.parametrize(
    "extra, option",
    [(["--json", "{dir}"], "--json"), (["--grid", "{dir}"], "--grid"), (["--figure", "{json}"], "--figure"),
     (["--n", "0"], "--n"), (["--steps", "0"], "--steps"), (["--seed", "-2"], "--seed"),
     (["--counts", "1,5-3"], "--counts"), (["--counts", "2-"], "--counts"), (["--threads", "0"], "--threads"),
     (["--guidance", "nan"], "--guidance")],
)
def test_cli_eval_checks_options_and_outputs_before_sampling(tmp_path, no_sampling, extra, option):
    json_path = tmp_path / "ev.json"
    extra = [a.format(dir=tmp_path, json=json_path) for a in extra]
    args = ["eval", "--model", "tiny-clevr", "--counts", "1", "--n", "1", "--steps", "1", "--json", str(json_path)]
    res = CliRunner().invoke(app, args + extra)
    assert res.exit_code == 2, res.output
    assert f"'{option}'" in res.output
    assert not isinstance(res.exception, AssertionError)


def test_output_writers_never_touch_a_users_temp_named_files(tmp_path):
    """The old writers used fixed ``NAME.tmp`` names beside the target, replacing a user's file of that name."""
    import matplotlib.pyplot as plt
    import torch

    from interp.clevr.evaluate import save_figure, write_outputs

    user = {"fig.tmp.png": "user", "out.json.tmp": "user", "out_samples.tmp.png": "user", "out_accuracy.tmp.png": "user"}
    _plant(tmp_path, user)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    assert save_figure(fig, tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    result = {
        "per_k": [{"k": 1, "n": 1, "count_acc": 1.0, "recall": 1.0, "precision": 1.0, "mean_count": 1.0}],
        "meta": {"model": "m", "n": 1},
        "_images": torch.zeros(1, 1, 3, 8, 8),
    }
    paths = write_outputs(result, tmp_path / "out.json")
    assert json.loads(paths["json"].read_text())["meta"]["model"] == "m"
    assert _unchanged(tmp_path, user)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_render_and_compare_refuse_bad_input(tmp_path, monkeypatch):
    runner = CliRunner()
    for args, option in ((["--per-row", "0"], "--per-row"), (["--size", "4"], "--size"), (["--out", str(tmp_path)], "--out"),
                         (["--counts", "3-1"], "--counts")):
        res = runner.invoke(app, ["render", "--out", str(tmp_path / "s.png"), *args])
        assert res.exit_code == 2 and f"'{option}'" in res.output, res.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = runner.invoke(app, ["compare", str(bad), "--out", str(tmp_path / "c.png")])
    assert res.exit_code == 2 and "not JSON" in _plain(res.output)
    res = runner.invoke(app, ["compare", str(bad), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "'--out'" in res.output

    # Two results of the same model (e.g. two seeds) stay two lines instead of one silently replacing the other.
    import interp.clevr.evaluate as ev

    seen = {}
    monkeypatch.setattr(ev, "compare_figure", lambda results, out, metric: seen.update(results))
    table = {"per_k": [{"k": 1, "count_acc": 1.0}], "meta": {"model": "exp1"}}
    for name in ("s0.json", "s1.json"):
        (tmp_path / name).write_text(json.dumps(table))
    res = runner.invoke(app, ["compare", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--out", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    assert len(seen) == 2 and "exp1" in seen


def test_shipping_never_replaces_a_folder_that_is_not_a_shipped_pipeline(tmp_path):
    from interp.clevr.checkpoints import ship

    assets = tmp_path / "assets"
    _plant(assets, {"exp1/mine.txt": "user"})
    with pytest.raises(FileExistsError, match="not a shipped pipeline"):
        ship(tmp_path / "no-run", "exp1", assets=assets)
    assert (assets / "exp1" / "mine.txt").read_text() == "user"
