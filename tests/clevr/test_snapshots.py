"""``snapshot_every`` keeps the EMA pipeline through training without changing a trained number."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from interp.clevr.train import SNAPSHOT_DIR, get_recipe, snapshot_folders, train
from interp.models.registry import load_model


def _unet(folder):
    return load_model(str(folder)).pipeline.unet.state_dict()


def test_snapshots_are_the_ema_at_their_step_and_change_nothing(tmp_path):
    rec = get_recipe("exp1", steps=4, batch_size=2, checkpoint_every=2)
    plain = train(rec, tmp_path / "plain", seed=3, progress=False)
    snap = train(rec, tmp_path / "snap", seed=3, progress=False, snapshot_every=2)
    assert plain.losses == snap.losses  # snapshots are not part of the recipe: the trajectory is the same
    assert not (tmp_path / "plain" / SNAPSHOT_DIR).exists()
    found = snapshot_folders(tmp_path / "snap")
    assert [s for s, _ in found] == [2, 4]
    # The last snapshot is the finished run's exported pipeline; the first is the EMA of a shorter run.
    final = _unet(tmp_path / "snap" / "pipeline")
    assert all(torch.equal(v, final[k]) for k, v in _unet(found[-1][1]).items())
    short = train(get_recipe("exp1", steps=2, batch_size=2, checkpoint_every=2), tmp_path / "short", seed=3, progress=False)
    early = _unet(short.pipeline_dir)
    assert all(torch.equal(v, early[k]) for k, v in _unet(found[0][1]).items())
    assert not all(torch.equal(v, final[k]) for k, v in early.items())  # the comparison can fail


def test_resumed_run_keeps_and_rewrites_snapshots_identically(tmp_path):
    rec = get_recipe("exp1", steps=4, batch_size=2, checkpoint_every=2)
    train(rec, tmp_path / "full", seed=1, progress=False, snapshot_every=1)
    train(rec, tmp_path / "cut", seed=1, progress=False, snapshot_every=1, stop_after=3)  # checkpoint at 2 and 3
    train(rec, tmp_path / "cut", seed=1, progress=False, snapshot_every=1)
    a, b = snapshot_folders(tmp_path / "full"), snapshot_folders(tmp_path / "cut")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, fa), (_, fb) in zip(a, b):
        ua, ub = _unet(fa), _unet(fb)
        assert all(torch.equal(v, ub[k]) for k, v in ua.items())


def test_bad_snapshot_interval_and_foreign_snapshot_folder_are_refused(tmp_path):
    from scorescope.cli import app

    rec = get_recipe("exp1", steps=2, batch_size=2, checkpoint_every=2)
    with pytest.raises(ValueError, match="snapshot_every"):
        train(rec, tmp_path / "a", snapshot_every=0, progress=False)
    res = CliRunner().invoke(app, ["clevr", "train", "--recipe", "exp1", "--out", str(tmp_path / "b"), "--snapshot-every", "0"])
    assert res.exit_code == 2 and "--snapshot-every" in res.output
    run = tmp_path / "c"
    run.mkdir()
    (run / SNAPSHOT_DIR).write_text("not ours")
    with pytest.raises(FileExistsError, match="--overwrite"):  # a foreign non-empty folder, before any training
        train(rec, run, progress=False)
    with pytest.raises(FileExistsError, match=SNAPSHOT_DIR):  # and even with overwrite, the file is never replaced
        train(rec, run, progress=False, overwrite=True, snapshot_every=1)
    assert (run / SNAPSHOT_DIR).read_text() == "not ours"


def test_training_works_inside_no_grad_and_restores_the_mode(tmp_path):
    rec = get_recipe("exp1", steps=2, batch_size=2, checkpoint_every=2)
    free = train(rec, tmp_path / "a", seed=5, progress=False)
    with torch.no_grad():
        inside = train(rec, tmp_path / "b", seed=5, progress=False)
        assert not torch.is_grad_enabled()  # the caller's mode is back
    assert inside.losses == free.losses
