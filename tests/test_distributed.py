"""Sweeps and training on two processes (torchrun, CPU, gloo) equal one process; a killed rank resumes cleanly.

Each torchrun launch runs this file as its script (``__main__`` below) on two ranks; the test compares what the
ranks wrote with a one-process run in the test process (same thread count: torchrun sets one thread per rank).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

EVAL_ARGS = ["clevr", "eval", "--model", "tiny-clevr", "--counts", "0,2,4", "--n", "3", "--steps", "2", "--seed", "1"]
ONLY = "unpatched,mask:all:r0.15,scores:r0.15"


def _toy():
    from interp.models.analytic import toy_conditioning, toy_denoiser

    return toy_denoiser("local", size=12, dtype=torch.float64), toy_conditioning([[0.25, 0.25], [0.75, 0.7]], dtype=torch.float64)


def _sweep(out: Path, radius: float = 0.2, progress=None):
    from probes import locality_sweep

    den, cond = _toy()
    return locality_sweep(den, cond, sites=["output", "inject"], t=[0.2, 0.8], seeds=[0, 1], out=out, directions=2,
                          radius=radius, dtype=torch.float64, progress=progress)


def _intervene(out: Path):
    from scorescope.experiments.locality_sweep import run_locality_sweep

    return run_locality_sweep("tiny-clevr", counts=[1, 2], out=out, n=2, steps=2, only=ONLY, references=[], figures=False,
                              device="cpu")


def _profile(out: Path):
    from scorescope.experiments.feature_profile import run_profile

    return run_profile("tiny-clevr", out=out, sites="*attn2", t=[0.5, 0.9], seeds=[0, 1], directions=2, figures=False,
                       device="cpu")


def ref_recipe():
    from interp.clevr.train import get_recipe

    return get_recipe("exp1", steps=3, batch_size=4, checkpoint_every=2)


def _train(out: Path, stop_after: int | None = None):
    from interp.clevr.train import train

    return train(ref_recipe(), out, seed=3, progress=False, stop_after=stop_after)


def _launch(mode: str, folder: Path, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT), **env)
    return subprocess.run([*TORCHRUN, __file__, mode, str(folder)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_detect_env_reads_the_launcher_variables_and_refuses_bad_ones():
    from interp.distributed import DistEnv, detect_env

    assert detect_env({}) == DistEnv(0, 1, 0)
    full = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert detect_env(full) == DistEnv(3, 4, 1)
    with pytest.raises(ValueError, match="RANK=4 is outside"):
        detect_env(dict(full, RANK="4"))
    with pytest.raises(ValueError, match="MASTER_PORT"):
        detect_env({k: v for k, v in full.items() if k != "MASTER_PORT"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        detect_env(dict(full, WORLD_SIZE="two"))


def test_two_processes_equal_one_and_a_killed_rank_resumes(tmp_path, one_thread):
    """A 2-rank locality sweep whose rank 1 is SIGKILLed, relaunched with the clevr eval (CLI), intervention sweep,
    features profile and training on two ranks: every table equals one process's; nothing finished is recomputed or duplicated."""
    from typer.testing import CliRunner

    from scorescope.cli import app

    two = tmp_path / "two"
    first = _launch("sweep", two, SCORESCOPE_DIST_KILL_AFTER="1:1")  # rank 1 SIGKILLs itself after its 1st part
    assert first.returncode != 0
    parts = sorted((two / "sweep" / "parts").glob("*.csv"))
    assert 1 <= len(parts) < 8 and not (two / "sweep" / "results.csv").exists()
    # every part is complete (a write cut short leaves only a hidden .tmp file, never a part)
    import pandas as pd

    assert all(len(pd.read_csv(p)) and pd.read_csv(p)["unit"].nunique() == 1 for p in parts)
    before = {p.name: p.read_bytes() for p in parts}

    run = _launch("all", two)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = json.loads((two / "sweep_ranks.json").read_text())
    assert sorted(ranks) == ["0", "1"] and sum(ranks.values()) == 8 - len(before)  # only the missing units ran
    assert {p.name: p.read_bytes() for p in parts} == before  # finished parts untouched
    # locality sweep: the very same results.csv as one process, byte for byte (no duplicate rows)
    _sweep(tmp_path / "one-sweep")
    assert (two / "sweep" / "results.csv").read_text() == (tmp_path / "one-sweep" / "results.csv").read_text()
    # the settings refusal reached both ranks: rank 0 raised the real error, rank 1 stopped with it
    refused = json.loads((two / "refused.json").read_text())
    assert "radius" in refused["0"] and refused["0"].startswith("ValueError")
    assert refused["1"].startswith("RankAborted") and "radius" in refused["1"]

    # clevr eval: the same per-k table and sample grid (the k x batch units went through NAME_parts/)
    one = tmp_path / "one-eval.json"
    res = CliRunner().invoke(app, [*EVAL_ARGS, "--json", str(one)])
    assert res.exit_code == 0, res.output
    a, b = json.loads((two / "eval.json").read_text()), json.loads(one.read_text())
    assert a["per_k"] == b["per_k"] and len(list((two / "eval_parts").glob("*.safetensors"))) == 3
    assert (two / "eval_samples.png").read_bytes() == (tmp_path / "one-eval_samples.png").read_bytes()

    # intervention sweep: the same table
    _intervene(tmp_path / "one-iv")
    assert (two / "iv" / "results.csv").read_text() == (tmp_path / "one-iv" / "results.csv").read_text()

    # features profile: the same table (units (seed, t) split over the ranks; all layers of a unit on one rank)
    _profile(tmp_path / "one-prof")
    assert (two / "prof" / "results.csv").read_text() == (tmp_path / "one-prof" / "results.csv").read_text()
    layers = len(json.loads((two / "prof" / "profile.json").read_text())["sites"])
    assert list(json.loads((two / "prof_ran.json").read_text()).values()) == [2 * layers, 2 * layers]  # 2 units each

    # training (stopped at step 2 and resumed, on two ranks): rank r takes its shard of the same global batch,
    # so the curve and weights are the one-process ones
    ref = _train(tmp_path / "one-train")
    losses = json.loads((two / "train_losses.json").read_text())
    assert losses["0"] == losses["1"]  # every rank logs the global batch's loss
    assert losses["0"] == pytest.approx(ref.losses, rel=1e-5, abs=1e-7)
    # Weights: AdamW's first steps move each weight by about lr * sign(gradient), so float noise in a tiny
    # gradient moves single weights by up to ~lr; compare the whole difference with the whole update instead.
    from safetensors.torch import load_file

    from interp.clevr.train import _Trainable, build_pipeline, latest_checkpoint

    w2 = load_file(str(latest_checkpoint(two / "train") / "model.safetensors"))
    w1 = load_file(str(latest_checkpoint(tmp_path / "one-train") / "model.safetensors"))
    init = build_pipeline(ref_recipe(), 3)
    w0 = _Trainable(init.unet, init.location_encoder).state_dict()
    assert w1.keys() == w2.keys() == w0.keys()
    diff = torch.cat([(w2[k] - w1[k]).flatten() for k in w1]).norm()
    update = torch.cat([(w1[k] - w0[k]).flatten() for k in w1]).norm()
    assert update > 0 and diff < 0.02 * update  # measured here: 0.3 %


def _main(mode: str, folder: Path) -> None:
    """One rank of a launch: writes what the tests compare under ``folder``."""
    from interp.distributed import RankAborted, detect_env
    from interp.io import atomic_write_json

    rank = detect_env().rank
    folder.mkdir(parents=True, exist_ok=True)

    def per_rank(name: str, value) -> None:
        # each rank writes its own file; rank 0 merges them after a barrier
        atomic_write_json(folder / f".{name}.{rank}.json", value)

    done: list[str] = []
    _sweep(folder / "sweep", progress=lambda line: done.append(line) if line.startswith("done") else None)
    per_rank("sweep_ranks", len(done))
    if mode == "all":
        try:
            _sweep(folder / "sweep", radius=0.3)
            message = "not refused"
        except (ValueError, RankAborted) as err:
            message = f"{type(err).__name__}: {err}"
        per_rank("refused", message)
        from scorescope.cli import app

        app([*EVAL_ARGS, "--json", str(folder / "eval.json")], standalone_mode=False)
        _intervene(folder / "iv")
        per_rank("prof_ran", len(_profile(folder / "prof").ran))
        first = _train(folder / "train", stop_after=2).losses  # checkpoint at step 2, then resume on two ranks
        per_rank("train_losses", first + _train(folder / "train").losses)
    from interp.distributed import distributed

    with distributed() as dist:
        dist.barrier()  # every rank's files are written
        if dist.is_main:
            names = ["sweep_ranks"] + (["refused", "prof_ran", "train_losses"] if mode == "all" else [])
            for name in names:
                files = {str(r): folder / f".{name}.{r}.json" for r in range(dist.world_size)}
                atomic_write_json(folder / f"{name}.json", {r: json.loads(f.read_text()) for r, f in files.items()})

if __name__ == "__main__":
    _main(sys.argv[1], Path(sys.argv[2]))
