"""``scorescope features concepts``: concept geometry and composition on the shipped colour model.

Ground truths: the one-location case equals :func:`probes.concept_cosines`; a site the conditioning never
reaches has exactly zero difference vectors; Spearman's ρ against scipy and against monotone data; the scene
scoring against rendered scenes whose colours are known.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from scorescope.experiments import concepts as cx

COLOURS = ["red", "blue", "yellow"]


@pytest.fixture(scope="module")
def pipe():
    from interp.models.registry import load_model

    return load_model("colour").pipeline


def _d(pipe, sites, *, seeds=(0, 1), n_locations=2, seed=0, t=0.5):
    concepts = cx.colour_concepts(pipe, COLOURS, cx.concept_locations(n_locations, seed))
    null = concepts["red"][0].null()
    return cx.difference_vectors(pipe.denoiser(), sites, concepts, t, list(seeds), null=null)


def test_one_location_equals_the_probe_and_matrices_are_symmetric(pipe):
    import probes

    den = pipe.denoiser()
    locs = cx.concept_locations(1, 0)
    concepts = cx.colour_concepts(pipe, COLOURS, locs)
    d = cx.difference_vectors(den, ["mid_block", cx.PIXEL], concepts, 0.5, [0, 1], null=concepts["red"][0].null())
    ref = probes.concept_cosines(den, "mid_block", {c: concepts[c][0] for c in COLOURS}, 0.5, [0, 1])
    cos = cx.cosine_matrix(d["mid_block"], COLOURS)
    torch.testing.assert_close(cos.float(), ref.maps["cosine"], rtol=0, atol=1e-6)
    for site in ("mid_block", cx.PIXEL):
        m = cx.cosine_matrix(d[site], COLOURS)
        assert torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.ones(3, dtype=m.dtype))
        assert (m.abs() <= 1).all() and (m - torch.eye(3, dtype=m.dtype)).abs().max() > 0  # off-diagonal not trivially 1
    # every colour shares the same locations: only the colour differs between concepts
    for c in COLOURS:
        assert [cc.locations.tolist() for cc in concepts[c]] == [cc.locations.tolist() for cc in concepts["red"]]


def test_concept_means_come_from_the_seeds_given(pipe):
    a = _d(pipe, ["mid_block"], seeds=(0, 1))["mid_block"]
    b = _d(pipe, ["mid_block"], seeds=(0, 1))["mid_block"]
    other_noise = _d(pipe, ["mid_block"], seeds=(2, 3))["mid_block"]
    other_locations = _d(pipe, ["mid_block"], seeds=(0, 1), seed=1)["mid_block"]
    assert torch.equal(a, b)
    assert not torch.allclose(a, other_noise) and not torch.allclose(a, other_locations)


def test_zero_difference_vectors_raise_instead_of_nan(pipe):
    # down_blocks.0 runs before any cross-attention: the conditioning cannot reach it, d_i is exactly 0
    d = _d(pipe, ["down_blocks.0"], n_locations=1, seeds=(0,))["down_blocks.0"]
    assert torch.count_nonzero(d) == 0
    with pytest.raises(ValueError, match=r"\['red', 'blue', 'yellow'\] have a zero difference vector"):
        cx.cosine_matrix(d, COLOURS, where="down_blocks.0")
    one_zero = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"\['blue'\] have a zero difference vector"):
        cx.cosine_matrix(one_zero, COLOURS)
    assert "down_blocks.0" not in cx.default_sites(pipe.unet) and cx.PIXEL in cx.default_sites(pipe.unet)


def test_spearman_and_bootstrap_known_answers():
    from scipy.stats import spearmanr

    x = np.arange(10.0)
    up = cx.spearman_bootstrap(x, x**3, n_boot=500, seed=0)
    assert up["rho"] == pytest.approx(1.0) and up["lo"] == pytest.approx(1.0) and up["hi"] == pytest.approx(1.0)
    down = cx.spearman_bootstrap(x, -np.exp(x), n_boot=500, seed=0)
    assert down["rho"] == pytest.approx(-1.0) and down["hi"] == pytest.approx(-1.0)
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=28), np.round(rng.uniform(size=28), 1)  # ties on one side, as success fractions have
    assert cx.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    r1, r2 = cx.spearman_bootstrap(a, b, seed=1), cx.spearman_bootstrap(a, b, seed=2)
    assert r1 == cx.spearman_bootstrap(a, b, seed=1) and (r1["lo"], r1["hi"]) != (r2["lo"], r2["hi"])
    assert r1["lo"] < r1["rho"] < r1["hi"] and r1["n_pairs"] == 28
    flat = cx.spearman_bootstrap(a, np.ones(28))
    assert np.isnan(flat["rho"]) and np.isnan(flat["lo"]) and flat["n_boot"] == 0


def test_independence_baseline():
    rows = [{"colour_i": a, "colour_j": b, "success": s} for a, b, s in
            [("red", "red", 0.81), ("red", "blue", 0.5), ("blue", "blue", 0.64), ("red", "yellow", 0.9)]]
    # yellow has no i = j row: its pair has no baseline
    assert cx.independence_baseline(rows) == {("red", "blue"): pytest.approx(0.9 * 0.8)}


def test_block_structure_recovers_known_blocks():
    names = ["a", "b", "c", "d", "e"]
    cos = np.full((5, 5), 0.05)
    cos[:3, :3] = cos[3:, 3:] = -0.9  # |cos| groups: the sign does not matter
    np.fill_diagonal(cos, 1.0)
    blocks = cx.block_structure(cos, names)
    assert blocks["k"] == 2 and sorted(map(sorted, blocks["clusters"])) == [["a", "b", "c"], ["d", "e"]]
    assert blocks["within"] == pytest.approx(0.9) and blocks["across"] == pytest.approx(0.05)
    assert blocks["score"] == pytest.approx(0.85)


def test_scene_scoring_on_rendered_scenes_with_known_colours():
    from interp.clevr.render import random_scene, render

    locs = cx.pair_scenes(12, 3)
    cols = cx.scene_colours(1, 7, 12)  # red, yellow (alternating sides)
    scene = random_scene(np.random.default_rng(0), [2] * 12, positions=locs, colours=cols)
    images = render(scene).images
    right = cx.score_scenes(images, locs, cols)
    assert np.mean([s["success"] for s in right]) >= 11 / 12 and all(s["placed"] for s in right)
    wrong = cx.score_scenes(images, locs, cx.scene_colours(2, 7, 12))  # asked for blue where red was drawn
    assert not any(s["success"] for s in wrong)
    # asking for the objects at other places: nothing is placed
    away = [np.array([[0.05, 0.05], [0.95, 0.05]])] * 12
    assert not any(s["placed"] for s in cx.score_scenes(images, away, cols))


def test_palette_directions_under_both_baselines():
    from interp.clevr.render import COLOURS as RGB, floor

    black = cx.palette_directions(COLOURS, "black")
    fl = cx.palette_directions(COLOURS, "floor")
    assert np.allclose(black, [RGB[c] for c in COLOURS])
    assert np.allclose(black - fl, floor(32).reshape(3, -1).mean(1)[None], atol=1e-7)
    cos = {b: cx.cosine_matrix(torch.from_numpy(cx.palette_directions(COLOURS, b)), COLOURS) for b in ("floor", "black")}
    blue, yellow = COLOURS.index("blue"), COLOURS.index("yellow")
    assert cos["floor"][blue, yellow] < -0.95 and abs(cos["black"][blue, yellow]) < 0.7  # as the module docstring says
    with pytest.raises(ValueError, match="baseline must be one of"):
        cx.palette_directions(COLOURS, "white")


def _app():
    from scorescope.cli import app

    return app


SMALL = ["--colours", "red,blue,yellow", "--t", "0.5", "--seeds", "1", "--locations", "1", "--n", "2", "--steps", "2",
         "--sites", "mid_block,pixel", "--bootstrap", "50"]


def test_cli_end_to_end_and_resume(tmp_path):
    runner = CliRunner()
    out, js = tmp_path / "run", tmp_path / "c.json"
    res = runner.invoke(_app(), ["features", "concepts", "--out", str(out), "--json", str(js), *SMALL])
    assert res.exit_code == 0, res.output
    data = json.loads(js.read_text())
    assert set(data["cosines"]) == {"mid_block", "pixel"}
    for site in data["cosines"]:
        m = np.array(data["cosines"][site]["0.5"])
        assert m.shape == (3, 3) and np.array_equal(m, m.T) and np.array_equal(np.diag(m), np.ones(3))
    assert [(r["colour_i"], r["colour_j"]) for r in data["pairs"]] == [
        ("red", "red"), ("red", "blue"), ("red", "yellow"), ("blue", "blue"), ("blue", "yellow"), ("yellow", "yellow")]
    for r in data["pairs"]:
        assert r["n"] == 2 and r["success"] == r["successes"] / 2 and r["success_lo"] <= r["success"] <= r["success_hi"]
    assert set(data["correlation"]) == {"mid_block", "pixel"} and data["correlation"]["pixel"]["0.5"]["n_pairs"] == 3
    assert set(data["palette"]) == {"floor", "black"} and data["settings"]["colours"] == COLOURS
    rb = next(r for r in data["pairs"] if (r["colour_i"], r["colour_j"]) == ("red", "blue"))
    single = {r["colour_i"]: r["success"] for r in data["pairs"] if r["same"]}
    assert rb["excess"] == pytest.approx(rb["success"] - (single["red"] * single["blue"]) ** 0.5)
    assert set(data["correlation_excess"]) == {"mid_block", "pixel"}
    assert all(p["correlation"]["n_pairs"] == 3 for p in data["palette"].values())
    assert {p.name for p in out.glob("*.png")} == {"cosines_mid_block.png", "cosines_pixel.png", "palette.png"} | (
        {"scatter.png"} if data["best"] else set())
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    again = runner.invoke(_app(), ["features", "concepts", "--out", str(out), "--no-figures", *SMALL])
    assert again.exit_code == 0 and "0 pairs sampled, 6 resumed" in again.output, again.output
    assert json.loads((out / "concepts.json").read_text())["pairs"] == data["pairs"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before  # --no-figures drew none
    more = [("3" if i and SMALL[i - 1] == "--n" else a) for i, a in enumerate(SMALL)]  # another n: a fixed setting
    other = runner.invoke(_app(), ["features", "concepts", "--out", str(out), *more])
    assert other.exit_code == 2 and "'--out'" in other.output and "different settings" in other.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    res = runner.invoke(_app(), ["features", "concepts", "--out", str(foreign), *SMALL])
    assert res.exit_code == 2 and "'--out'" in res.output and (foreign / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("args,option,words", [
    (["--colours", "red,yelow"], "--colours", "did you mean 'yellow'"),
    (["--sites", "mid_blok"], "--sites", "mid_block"),
    (["--t", "0.5,1.5"], "--t", "[0, 1]"),
    (["--model", "exp1"], "--model", "colour-conditioned"),
    (["--n", "0"], "--n", ">= 1"),
])
def test_cli_refuses_bad_input_naming_the_option(tmp_path, args, option, words):
    res = CliRunner().invoke(_app(), ["features", "concepts", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.replace("│", " ").split())
    assert f"'{option}'" in flat and words in flat, res.output
    assert not (tmp_path / "o").exists()  # refused before the output folder is claimed
