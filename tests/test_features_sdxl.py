"""`scorescope features sdxl`: style + content ablation maps, layer dependence and concept cosines on tiny SDXL.

Everything runs on the random-weight tiny SDXL (no real weights exist here): the tests check the code path and
the measurements' definitions against direct computations and the existing probes, never SDXL numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from scorescope.cli import app
from scorescope.experiments import sdxl_features as sf

runner = CliRunner()

STYLES = ["a watercolor painting", "an oil painting"]
CONTENTS = ["a cat", "a dog"]
SITES = "down_blocks.0,mid_block"  # down_blocks.0 runs before any cross-attention: no phrase can move it


@pytest.fixture(scope="module")
def tiny16():
    """A tiny SDXL pipeline with a 16 x 16 latent (a quarter of the default's pixels: a quarter of the cost)."""
    from interp.models.sdxl import tiny_sdxl

    return tiny_sdxl(0, sample_size=16)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny16) -> Path:
    """The tiny pipeline saved with save_pretrained: the command loads it through from_pretrained (the real path)."""
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny16.save_pretrained(folder)
    return folder


def _args(folder: Path, out: Path, *extra: str) -> list[str]:
    args = ["features", "sdxl", "--model", str(folder), "--out", str(out), "--no-builtin", "--t", "0.5", "--seeds", "2",
            "--sites", SITES, "--device", "cpu"]
    for s in STYLES:
        args += ["--style", s]
    for c in CONTENTS:
        args += ["--content", c]
    return args + list(extra)


class _CountUNetCalls:
    """Counts every UNet2DConditionModel forward (truncated ones included) while active."""

    def __enter__(self):
        from diffusers import UNet2DConditionModel

        self.n = 0

        def pre(module, args):
            if isinstance(module, UNet2DConditionModel):
                self.n += 1

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(pre)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_folder):
    import diffusers

    out = tmp_path_factory.mktemp("run") / "sdxl"
    real = diffusers.StableDiffusionXLPipeline.from_pretrained.__func__
    loads: list[str] = []

    def spy(cls, path, *args, **kwargs):
        loads.append(str(path))
        return real(cls, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, _CountUNetCalls() as counter:
        mp.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained", classmethod(spy))
        res = runner.invoke(app, _args(tiny_folder, out, "--json", str(out.parent / "extra.json")))
    assert res.exit_code == 0, res.output
    assert loads == [str(tiny_folder)]  # the real loader: StableDiffusionXLPipeline.from_pretrained on the folder
    return out, json.loads((out / "results.json").read_text()), counter.n


def test_outputs_exist_and_rows_are_tidy_one_per_seed(run):
    out, data, _ = run
    for name in ("ablation_maps.png", "cosines.png", "spread.png", "settings.json"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out.parent / "extra.json").read_text())["rows"] == data["rows"]
    rows = data["rows"]
    assert set(rows[0]) == set(sf.COLUMNS)
    keys = [(r["prompt"], r["phrase"], r["site"], r["t"], r["seed"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))  # one row per (prompt, phrase, site, t, seed, metric)
    # 4 prompts x 2 phrases x 3 sites (output + 2) x 1 t x 2 seeds x every metric
    assert len(rows) == 4 * 2 * 3 * 2 * len(sf.METRICS)
    assert {r["seed"] for r in rows} == {0, 1}
    assert {r["kind"] for r in rows if r["phrase"] in STYLES} == {"style"}
    assert {r["kind"] for r in rows if r["phrase"] in CONTENTS} == {"content"}
    assert data["settings"]["random_weights"] is False and data["settings"]["sites"] == ["down_blocks.0", "mid_block"]


def test_plan_call_count_is_the_calls_made(run):
    _, data, counted = run
    # by hand: 4 prompts x (1 + 2 phrases) x 1 t ablation calls; (2 sites + output) x 1 t x (8 concepts + null)
    assert data["calls"] == {"ablation": 12, "cosine": 27, "total": 39} == data["planned_calls"]
    assert counted == 39


def test_ablation_maps_equal_direct_computation(run, tiny16):
    from safetensors.torch import load

    from interp.inputs import forward_samples
    from interp.models.sdxl import prompt_conditioning, sdxl_denoiser

    out, data, _ = run
    den = sdxl_denoiser(tiny16)
    prompt = sf.Prompt(STYLES[1], CONTENTS[0])
    cond = prompt_conditioning(tiny16, list(prompt.phrases), sep=sf.SEP)
    part = next(p for p in (out / "parts").glob("*.json") if json.loads(p.read_text()).get("prompt") == prompt.text)
    maps = load(part.with_suffix(".safetensors").read_bytes())["ablation"]  # (T, k, H, W), mean over seeds
    assert (maps >= 0).all()
    x, ts = forward_samples(den, 0.5, [0, 1])
    with torch.no_grad():
        full = den.predict(x, ts, cond, branch="cond")
        for j in range(2):
            by_hand = (full - den.predict(x, ts, cond.drop(j), branch="cond")).pow(2).sum(1).sqrt()  # (S, H, W)
            torch.testing.assert_close(maps[0, j], by_hand.mean(0), rtol=1e-4, atol=1e-6)
            for s in (0, 1):
                row = next(r for r in data["rows"] if r["prompt"] == prompt.text and r["phrase"] == prompt.phrases[j]
                           and r["site"] == "output" and r["seed"] == s and r["metric"] == "mass")
                assert row["value"] == pytest.approx(float(by_hand[s].sum()), rel=1e-4)
                assert row["value"] > 0


def test_layer_maps_equal_the_probes_and_vanish_before_cross_attention(run, tiny16):
    import probes
    from interp.models.sdxl import prompt_conditioning, sdxl_denoiser

    _, data, _ = run
    den = sdxl_denoiser(tiny16)
    prompt = sf.Prompt(STYLES[0], CONTENTS[1])
    cond = prompt_conditioning(tiny16, list(prompt.phrases), sep=sf.SEP)

    def rows(site, seed, metric):
        return [r["value"] for r in data["rows"] if r["prompt"] == prompt.text and r["site"] == site
                and r["seed"] == seed and r["metric"] == metric]

    fd = probes.feature_dependence(den, "mid_block", cond, t=0.5, seeds=[1], maps=("ablation",), radius=None, cpc=False)
    assert rows("mid_block", 1, "mass") == pytest.approx(fd.maps["ablation"][0].flatten(1).sum(1).tolist(), rel=1e-4)
    cl = probes.conditional_locality(den, cond, t=0.5, seeds=[1], maps=("ablation",), radius=None)
    assert rows("output", 1, "mass") == pytest.approx(cl.maps["ablation"][0].flatten(1).sum(1).tolist(), rel=1e-4)
    # down_blocks.0 sees no text tokens (only the pooled embedding, which drop keeps): every map is exactly zero,
    # and a zero map has no shape, so its shape measures are null instead of a made-up 0
    zero = [r for r in data["rows"] if r["site"] == "down_blocks.0"]
    assert {r["value"] for r in zero if r["metric"] in ("mass", "relative")} == {0.0}
    assert all(r["value"] is None for r in zero if r["metric"] not in ("mass", "relative"))
    real = [r["value"] for r in data["rows"] if r["site"] != "down_blocks.0" and r["metric"] == "support_90"]
    assert real and all(0 < v <= 1 for v in real)


def test_cosine_matrices_symmetric_unit_diagonal_with_block_scores(run):
    _, data, _ = run
    assert list(data["cosines"]) == ["output", "down_blocks.0", "mid_block"]
    for site, per_t in data["cosines"].items():
        entry = per_t["0.5"]
        m = torch.tensor(entry["matrix"])
        assert entry["concepts"] == [*STYLES, *CONTENTS, *[f"{s}, {c}" for s in STYLES for c in CONTENTS]]
        assert torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.ones(8, dtype=m.dtype))
        a = m.abs()
        within = (a[0, 1] + a[2, 3]) / 2
        across = (a[0, 2] + a[0, 3] + a[1, 2] + a[1, 3]) / 4
        assert entry["blocks"]["block_score"] == pytest.approx(float(within - across), abs=1e-6)
    assert {r["metric"] for r in data["cosine_rows"]} == set(sf.COSINE_METRICS)


def test_rerun_resumes_without_unet_calls(run, tiny_folder):
    out, data, _ = run
    with _CountUNetCalls() as counter:
        res = runner.invoke(app, _args(tiny_folder, out))
    assert res.exit_code == 0, res.output
    assert counter.n == 0 and "0 units run" in res.output
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == data["rows"] and again["cosines"] == data["cosines"]
    # other fixed settings in the same folder are refused, naming them
    res = runner.invoke(app, _args(tiny_folder, out, "--seeds", "1"))
    assert res.exit_code == 2 and "'--out'" in res.output and "seeds" in res.output


def test_plan_on_meta_sdxl_loads_no_weights(tmp_path, monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("--plan must not load weights")

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", refuse)
    res = runner.invoke(app, ["features", "sdxl", "--plan", "--model", str(tmp_path / "no-such-model"),
                              "--out", str(tmp_path / "plan"), "--json", str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan == json.loads((tmp_path / "plan.json").read_text())
    # by hand, defaults: 3 styles x 4 contents = 12 prompts, 2 phrases, t = 0.2/0.5/0.8, 2 seeds, 7 block sites;
    # 3 + 4 + 12 = 19 concepts: ablation 12 * 3 * 3 = 108, cosine (7 + 1) * 3 * (19 + 1) = 480
    assert plan["calls"] == {"ablation": 108, "cosine": 480, "total": 588}
    assert "588 U-Net calls" in res.output
    # per sample at the 128 x 128 latent: down 320*64^2, 640*32^2, 1280*32^2; mid 1280*32^2; up 1280*64^2,
    # 640*128^2, 320*128^2; output 4*128^2 -- x 2 seeds x 2 bytes (float16)
    per_sample = 320 * 64**2 + 640 * 32**2 + 1280 * 32**2 + 1280 * 32**2 + 1280 * 64**2 + 640 * 128**2 + 320 * 128**2 + 4 * 128**2
    assert plan["ablation_bytes_per_call"] == per_sample * 2 * 2
    assert plan["peak_bytes"] == 2 * plan["ablation_bytes_per_call"]
    assert plan["total_bytes"] > 108 * plan["ablation_bytes_per_call"]


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--no-builtin"], "'--style'"),  # an empty prompt set
        (["--no-builtin", "--style", "a watercolor painting"], "'--content'"),
        (["--style", "  "], "'--style'"),  # an empty phrase
        (["--t", "1.5"], "'--t'"),
        (["--t", "-0.1"], "'--t'"),
        (["--seeds", "0"], "'--seeds'"),
        (["--dtype", "float8"], "'--dtype'"),
    ],
)
def test_bad_options_refused_before_loading(tmp_path, extra, option):
    res = runner.invoke(app, ["features", "sdxl", "--model", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "o"),
                              *extra])
    assert res.exit_code == 2 and option in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_unknown_site_and_non_sdxl_models_refused(tmp_path, tiny_clevr_pipe):
    res = runner.invoke(app, ["features", "sdxl", "--model", "tiny-sdxl", "--out", str(tmp_path / "o"), "--sites",
                              "mid_blok"])
    assert res.exit_code == 2 and "'--sites'" in res.output and "mid_block" in res.output
    clevr = tmp_path / "clevr"
    tiny_clevr_pipe.save_pretrained(clevr)
    for model in (clevr, tmp_path / "missing" / "folder", tmp_path):  # a CLEVR pipeline, no such path, a plain folder
        res = runner.invoke(app, ["features", "sdxl", "--model", str(model), "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and "'--model'" in res.output and "SDXL" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_builtin_prompt_set_and_blocks(tiny16):
    prompts = sf.prompt_set()
    assert [p.text for p in prompts[:2]] == ["a watercolor painting, a cat", "a watercolor painting, a dog"]
    assert len(prompts) == 12 and {p.style for p in prompts} == set(sf.STYLES) and {p.content for p in prompts} == set(sf.CONTENTS)
    extra = sf.prompt_set(["a pencil sketch", "an ukiyo-e print"], ["a boat"])
    assert len(extra) == 4 * 5  # a duplicate phrase is kept once
    assert list(sf.concept_set(prompts))[:7] == [*sf.STYLES, *sf.CONTENTS]
    assert sf.resolve_sites(tiny16.unet, "blocks") == ["down_blocks.0", "down_blocks.1", "mid_block",
                                                               "up_blocks.0", "up_blocks.1"]


def test_default_dtype_half_only_for_hub_ids_on_cuda(tmp_path):
    assert sf.default_dtype("stabilityai/stable-diffusion-xl-base-1.0", "cuda") is torch.float16
    assert sf.default_dtype("stabilityai/stable-diffusion-xl-base-1.0", "cpu") is None
    assert sf.default_dtype("tiny-sdxl", "cuda") is None and sf.default_dtype(str(tmp_path), "cuda:0") is None


def test_map_metrics_on_known_maps():
    # one position holds all the difference: concentrated; a flat difference: spread over every position
    one = torch.zeros(1, 2, 4, 4)
    one[0, 0, 1, 2] = 3.0
    flat = torch.ones(1, 2, 4, 4)
    full = torch.ones(1, 2, 4, 4)
    a, b = sf.map_metrics(one, full)[0], sf.map_metrics(flat, full)[0]
    assert a["pr_fraction"] == pytest.approx(1 / 16) and a["support_90"] == pytest.approx(1 / 16) and a["hoyer"] == pytest.approx(1)
    assert a["channel_support_90"] == pytest.approx(1 / 2) and a["channel_hoyer"] == pytest.approx(1)
    assert b["pr_fraction"] == pytest.approx(1) and b["support_90"] == pytest.approx(15 / 16) and b["hoyer"] == pytest.approx(0)
    assert b["relative"] == pytest.approx(1.0) and a["mass"] == pytest.approx(3.0)
    z = sf.map_metrics(torch.zeros(1, 2, 4, 4), full)[0]
    assert z["mass"] == 0 and all(math.isnan(z[m]) for m in sf.METRICS[2:])
