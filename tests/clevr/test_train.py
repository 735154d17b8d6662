"""A few-step training run saves, resumes after an interruption and matches an uninterrupted run exactly."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from interp.models.registry import load_model
from interp.clevr.train import get_recipe, latest_checkpoint, train


def _weights(run):
    ck = latest_checkpoint(run)
    return {n: load_file(str(ck / f"{n}.safetensors")) for n in ("model", "ema", "optimizer")}


@pytest.mark.parametrize("name", ["exp1", "exp3"])
def test_interrupted_run_resumes_bit_identically(tmp_path, name):
    rec = get_recipe(name, steps=4, batch_size=4, checkpoint_every=2)
    full = train(rec, tmp_path / "full", seed=7, progress=False)
    part = train(rec, tmp_path / "cut", seed=7, progress=False, stop_after=3)
    assert part.step == 3 and not (tmp_path / "cut" / "pipeline").exists()
    # a kill during a checkpoint write leaves a temporary folder behind; resume must ignore it
    (tmp_path / "cut" / ".tmp-ckpt-0000004").mkdir()
    (tmp_path / "cut" / ".tmp-ckpt-0000004" / "model.safetensors").write_bytes(b"garbage")
    rest = train(rec, tmp_path / "cut", seed=7, progress=False)
    assert rest.step == 4
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for part_name in a:
        assert a[part_name].keys() == b[part_name].keys()
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k]), f"{part_name}/{k} differs after resume"
    assert full.losses == part.losses + rest.losses
    rows = list(csv.DictReader((tmp_path / "cut" / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    # the finished run exports its EMA weights as a loadable pipeline, and a run folder loads as a model
    p1 = load_model(str(tmp_path / "full" / "pipeline")).pipeline
    p2 = load_model(str(tmp_path / "full")).pipeline
    for k, v in p1.unet.state_dict().items():
        assert torch.equal(v, p2.unet.state_dict()[k])
    # a different seed really gives different weights (the comparison above can fail)
    other = train(rec, tmp_path / "other", seed=8, progress=False)
    assert other.losses != full.losses


def test_colour_recipe_trains(tmp_path):
    rec = get_recipe("colour", steps=2, batch_size=4, checkpoint_every=2)
    res = train(rec, tmp_path / "c", seed=0, progress=False)
    assert res.step == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    state = json.loads((latest_checkpoint(tmp_path / "c") / "state.json").read_text())
    assert state["recipe"]["encoder"] == "colour"


def test_resuming_a_different_run_and_unknown_recipes_raise(tmp_path):
    train(get_recipe("exp1", steps=2, batch_size=2, checkpoint_every=2), tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="different run"):
        train(get_recipe("exp2", steps=2, batch_size=2, checkpoint_every=2), tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("exp7")
    with pytest.raises(ValueError, match="unknown profile"):
        get_recipe("exp1", "tpu")
    with pytest.raises(ValueError, match="unknown recipe fields"):
        get_recipe("exp1", stepz=3)


def test_cli_rejects_unknown_recipe(tmp_path):
    from interp.clevr.cli import app

    res = CliRunner().invoke(app, ["train", "--recipe", "exp9", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0
    assert "unknown recipe" in res.output


def test_extending_a_finished_run_equals_one_longer_run(tmp_path):
    """``steps`` is not part of a run's identity: 2 steps, then extended to 4, equals 4 steps in one go."""
    rec = dict(batch_size=2, checkpoint_every=2)
    train(get_recipe("exp1", steps=2, **rec), tmp_path / "ext", progress=False)
    train(get_recipe("exp1", steps=4, **rec), tmp_path / "ext", progress=False)
    train(get_recipe("exp1", steps=4, **rec), tmp_path / "once", progress=False)
    a, b = _weights(tmp_path / "ext"), _weights(tmp_path / "once")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_is_what_the_denoiser_decodes(prediction_type):
    """The loop's regression target, read back through the exported scheduler's ``prediction_type``, gives x0 and ε."""
    from interp.clevr.train import build_pipeline, training_target

    rec = get_recipe("exp3", prediction_type=prediction_type)
    pipe = build_pipeline(rec)
    den = pipe.denoiser()
    assert den.prediction_type == prediction_type
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 500, 999])
    ab = den.alpha_bar(t).view(3, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = training_target(prediction_type, x0, noise, ab)
    torch.testing.assert_close(den.to_x0(target, x_t, t), x0, rtol=0, atol=1e-9 if prediction_type != "epsilon" else 1e-4)
    torch.testing.assert_close(den.to_epsilon(target, x_t, t), noise, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="prediction_type"):
        training_target("x0", x0, noise, ab)
    with pytest.raises(ValueError, match="prediction_type"):
        build_pipeline(get_recipe("exp3", prediction_type="sample"))


def test_checkpoints_from_before_a_recipe_field_existed_still_resume(tmp_path):
    """A ``state.json`` written before ``prediction_type`` existed is read with the field's default (ε)."""
    rec = get_recipe("exp3", steps=2, batch_size=2, checkpoint_every=2, prediction_type="epsilon")
    train(rec, tmp_path / "old", progress=False)
    state_path = latest_checkpoint(tmp_path / "old") / "state.json"
    state = json.loads(state_path.read_text())
    del state["recipe"]["prediction_type"]
    state_path.write_text(json.dumps(state))
    assert train(get_recipe("exp3", steps=3, batch_size=2, checkpoint_every=2, prediction_type="epsilon"), tmp_path / "old", progress=False).step == 3
    with pytest.raises(ValueError, match="prediction_type"):
        train(get_recipe("exp3", steps=4, batch_size=2, checkpoint_every=2, prediction_type="v_prediction"), tmp_path / "old", progress=False)


@pytest.mark.parametrize("name", ["exp1", "exp3", "colour"])
def test_gpu_recipes_build_and_take_a_step(tmp_path, name):
    """The GPU profile (64×64, base U-Net) on CPU, one tiny step: the recipes that no CI GPU runs stay valid."""
    rec = get_recipe(name, "gpu", steps=1, batch_size=2)
    assert rec.size == 64
    res = train(rec, tmp_path / name, progress=False)
    assert res.step == 1 and torch.isfinite(torch.tensor(res.losses)).all()
    pipe = load_model(str(res.pipeline_dir)).pipeline
    assert pipe.unet.config.sample_size == 64


@pytest.mark.parametrize("name, expected", [("exp1", ["0.634998", "0.301502", "0.693194"])])
def test_one_process_loss_log_is_unchanged_by_the_multi_process_sharding(tmp_path, name, expected):
    # Recorded (1 thread) from train() before ranks took shards of one global batch: the one-process path must
    # give the very same numbers, since shipped checkpoints and running trainings resume on it.
    res = train(get_recipe(name, steps=3, batch_size=4, checkpoint_every=3), tmp_path / name, seed=3, progress=False)
    rows = list(csv.DictReader((tmp_path / name / "loss.csv").open()))
    assert [r["loss"] for r in rows] == expected
    assert [f"{v:.6f}" for v in res.losses] == expected
