"""`scorescope features profile`: the feature-space locality profile against a model with known structure.

Ground truth: :class:`interp.models.analytic.ChannelLocalUNet`, whose layer ``features`` (8×8 on a 16×16 image)
has channels 0–3 depending only on conditioner 0 and channels 4–5 only on conditioner 1, each inside a disc
of radius ρ = 0.25 around its conditioner, with equal strength across a group (channels 6–7: on none).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from interp.models.analytic import channel_local_denoiser, toy_conditioning
from scorescope.experiments.feature_profile import feature_profile, profile_sites

RHO = 0.25
C = 8


@pytest.fixture(scope="module")
def analytic():
    den = channel_local_denoiser(dtype=torch.float64, cond_radius=RHO)
    # 0.53 apart > 2ρ: the two discs are disjoint
    cond = toy_conditioning([[0.3, 0.3], [0.7, 0.65]], dtype=torch.float64)
    return den, cond


def _values(df: pd.DataFrame, metric: str) -> np.ndarray:
    sel = df[df.metric == metric].sort_values(["t", "conditioner"])
    return sel.value.to_numpy()


def test_profile_reports_the_known_feature_structure(analytic):
    den, cond = analytic
    df = feature_profile(den, cond, sites="features", t=[0.2, 0.8], seeds=[0], radius=RHO, directions="all",
                         dtype=torch.float64)
    assert set(df.site) == {"features"} and (df.height == 8).all() and (df.channels == C).all()
    n = np.array([4, 2] * 2)  # group sizes, per (t, conditioner)
    assert np.allclose(_values(df, "in_region"), 1.0, atol=1e-12)
    assert np.allclose(_values(df, "leak_other") + _values(df, "leak_background"), 0.0, atol=1e-12)
    assert np.allclose(_values(df, "channel_pr"), n, rtol=1e-12)
    assert np.allclose(_values(df, "channel_pr_fraction"), n / C, rtol=1e-12)
    assert np.allclose(_values(df, "channel_hoyer"), (math.sqrt(C) - np.sqrt(n)) / (math.sqrt(C) - 1), rtol=1e-12)
    assert np.allclose(_values(df, "channel_support"), np.ceil(0.9 * n) / C)  # 4/8 and 2/8 of the channels
    assert np.allclose(_values(df, "n_eff"), 1.0, atol=1e-12)  # disjoint discs: one conditioner per position
    # a disc smaller than the support leaves mass outside; a larger one changes nothing
    small = feature_profile(den, cond, sites="features", t=[0.5], seeds=[0], radius=0.6 * RHO, directions="all",
                            dtype=torch.float64)
    assert (_values(small, "in_region") < 0.95).all()
    big = feature_profile(den, cond, sites="features", t=[0.5], seeds=[0], radius=2 * RHO, directions=8, dtype=torch.float64)
    # the support is exact with random directions too (only the magnitudes are estimated)
    assert np.allclose(_values(big, "in_region"), 1.0, atol=1e-12) and np.allclose(_values(big, "n_eff"), 1.0, atol=1e-12)
    assert ((_values(big, "channel_support") <= np.array([4, 2]) / C + 1e-12)).all()


def test_co_located_conditioners_with_equal_groups_give_two_effective_conditioners():
    den = channel_local_denoiser(dtype=torch.float64, cond_radius=RHO, groups=((0, 1, 2), (3, 4, 5)))
    cond = toy_conditioning([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    df = feature_profile(den, cond, sites=["features"], t=[0.5], seeds=[3], directions="all", dtype=torch.float64)
    assert np.allclose(_values(df, "n_eff"), 2.0, rtol=1e-12)


def test_same_seed_same_numbers_and_layers_in_execution_order(tiny_clevr_pipe):
    den = tiny_clevr_pipe.denoiser()
    cond = tiny_clevr_pipe.conditioning([[0.25, 0.3], [0.72, 0.7]])
    kw = dict(sites="up_blocks.0.attentions.0.transformer_blocks.0.attn2,down_blocks.1.*attn2", t=[0.5], directions=2)
    a = feature_profile(den, cond, seeds=[1, 2], **kw)
    b = feature_profile(den, cond, seeds=[1], **kw)
    # seed 1 gives the same numbers run again, alone or beside seed 2
    pd.testing.assert_frame_equal(a[a.seed == 1].reset_index(drop=True), b)
    assert list(dict.fromkeys(a.site)) == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                           "up_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in den.unet.modules())  # every hook removed
    mass = a[a.metric == "mass"].pivot_table(index=["site", "conditioner"], columns="seed", values="value")
    assert not np.allclose(mass[1], mass[2])  # one row set per seed, not an average
    # a glob keeps the outermost spatial modules it matches; 'auto' = cross-attention + residual blocks
    sites = [s.path for s in profile_sites(den, "*resnets*", cond)]
    assert sites and all(s.split(".")[-2] == "resnets" for s in sites)
    auto = [s.path for s in profile_sites(den, "auto", cond)]
    assert set(auto) == set(sites) | {p for p in auto if p.endswith("attn2")} and sum(p.endswith("attn2") for p in auto) == 7


def test_bad_sites_are_refused(tiny_clevr_pipe):
    from interp.site import SiteError

    den = tiny_clevr_pipe.denoiser()
    cond = tiny_clevr_pipe.conditioning([[0.25, 0.3]])
    with pytest.raises(SiteError, match="Closest real paths"):
        feature_profile(den, cond, sites="*atn2", t=[0.5], seeds=[0])
    with pytest.raises(ValueError, match="none runs in a forward pass and returns a spatial map"):
        feature_profile(den, cond, sites="*time_emb_proj", t=[0.5], seeds=[0])  # (B, C) outputs only
    with pytest.raises(ValueError, match="sites is empty"):
        feature_profile(den, cond, sites=" , ", t=[0.5], seeds=[0])
    assert not any(m._forward_hooks for m in den.unet.modules())
    for bad, words in (({"t": [1.5]}, r"\[0, 1\]"), ({"seeds": [0, 0]}, "repeat"), ({"seeds": [-1]}, ">= 0"),
                       ({"directions": 0}, "positive"), ({"radius": float("nan")}, "finite")):
        with pytest.raises(ValueError, match=words):
            feature_profile(den, cond, **{"sites": "*attn2", "t": [0.5], "seeds": [0], **bad})


def _cli(args):
    from scorescope.cli import app

    return CliRunner().invoke(app, ["features", "profile", *args])


def test_cli_default_path_writes_resumes_and_refuses(tmp_path):
    out, js = tmp_path / "prof", tmp_path / "prof.json"
    # the default path: auto sites, k = 3 scenes, radius 0.2, 8 directions (one noise level keeps it fast)
    r = _cli(["--model", "tiny-clevr", "--out", str(out), "--json", str(js), "--t", "0.5"])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    rows = pd.DataFrame(data["rows"])
    assert {"model", "site", "t", "seed", "metric", "value", "conditioner"} <= set(rows.columns)
    assert rows.site.nunique() == 18 and set(rows.metric) >= {"in_region", "channel_support", "channel_pr", "channel_hoyer", "n_eff"}
    assert len(data["metadata"]["scenes"]["0"]["locations"]) == 3 and data["wall_s"] > 0
    # layers before the first cross-attention do not depend on the conditioners: mass 0, fractions undefined
    first = rows[rows.site == "down_blocks.0.resnets.0"]
    assert (first[first.metric == "mass"].value == 0).all() and first[first.metric == "in_region"].value.isna().all()
    assert (out / "profile.png").stat().st_size > 0
    again = _cli(["--model", "tiny-clevr", "--out", str(out), "--t", "0.5", "--sites", "*attn2"])  # a subset: all done
    assert again.exit_code == 0 and "0 units run, 7 resumed" in again.output
    other = _cli(["--model", "tiny-clevr", "--out", str(out), "--t", "0.5", "--radius", "0.3"])
    assert other.exit_code == 2 and "'--out'" in other.output
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    refused = _cli(["--model", "tiny-clevr", "--out", str(user)])
    assert refused.exit_code == 2 and "--overwrite" in refused.output and (user / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("args, option, words", [
    (["--sites", "*atn2"], "--sites", "Closest real paths"),
    (["--sites", " , "], "--sites", "sites is empty"),
    (["--t", "0.5,1.5"], "--t", "[0, 1]"),
    (["--t", "half"], "--t", "numbers"),
    (["--seeds", "-1"], "--seeds", ">= 0"),
    (["--seeds", "0,x"], "--seeds", "integers"),
    (["--seeds", ","], "--seeds", "seeds is empty"),
    (["--directions", "0"], "--directions", "positive"),
    (["--radius", "0"], "--radius", "> 0"),
    (["--k", "0"], "--k", "1..4"),
])
def test_cli_refuses_bad_options(tmp_path, args, option, words):
    r = _cli(["--model", "tiny-clevr", "--out", str(tmp_path / "o"), *args])
    flat = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and f"'{option}'" in flat and words in flat, r.output
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_every_option_has_help_and_the_help_shows_an_example():
    import typer

    from scorescope.features_cli import app

    cmd = typer.main.get_command(app).commands["profile"]
    assert all(p.help for p in cmd.params), [p.name for p in cmd.params if not p.help]
    r = _cli(["--help"])
    assert r.exit_code == 0 and "scorescope features profile --model exp1" in " ".join(r.output.split())
