"""Every supported diffusers family, end to end on tiny random builds (``interp.models.tiny``).

The ground truths: the family's own pipeline (``interp.sample`` through the Denoiser must give its latents for
the same seed and steps), the unhooked network (a hooked forward changes nothing), and single-branch runs (the
branches of one batched CFG call, captured, equal separate runs: the test that catches swapped or merged
branches).
"""

from __future__ import annotations

import pytest
import torch

from interp import Denoiser, sample
from interp.capture import capture
from interp.models import class_conditioning, prompt_conditioning, tiny

FAMILIES = ("sd15", "sd2", "pixart", "dit", "sd3", "flux")
PHRASES = ["a red cube", "a blue sphere"]
#: A block site of each family's network (a module list's children).
BLOCKS = {"sd15": "down_blocks.0.attentions.0", "sd2": "up_blocks.1.attentions.0", "pixart": "transformer_blocks.1",
          "dit": "transformer_blocks.1", "sd3": "transformer_blocks.0", "flux": "single_transformer_blocks.0"}


@pytest.fixture(scope="module")
def pipes():
    return {f: tiny(f, 0) for f in FAMILIES}


def _conditioning(pipe, family):
    if family == "dit":
        return class_conditioning(pipe, 2)  # an id: DiTPipeline.save_pretrained does not keep the class names
    with torch.no_grad():  # as the pipelines encode (the fused attention kernel differs with grad on, ~1e-5)
        return prompt_conditioning(pipe, PHRASES)


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_equals_the_familys_own_pipeline(pipes, family):
    pipe = pipes[family]
    cond = _conditioning(pipe, family)
    scale = None if family == "flux" else 4.0  # tiny Flux is guidance-free (schnell-like): no CFG batch
    den = Denoiser(pipe, guidance_scale=scale)
    x = sample(den, cond, shape=(1, 4, 16, 16), num_steps=3, seed=7)
    gen = torch.Generator().manual_seed(7)
    if family == "dit":  # DiTPipeline always decodes: decode ours the same way
        ref = pipe(class_labels=[2], num_inference_steps=3, generator=gen,
                   guidance_scale=scale, output_type="pt").images
        with torch.no_grad():
            mine = (pipe.vae.decode(1 / pipe.vae.config.scaling_factor * x).sample / 2 + 0.5).clamp(0, 1)
        assert torch.equal(mine, ref)
        return
    kwargs = dict(num_inference_steps=3, generator=gen, output_type="latent", height=32, width=32)
    if family == "pixart":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    if scale is not None:
        kwargs["guidance_scale"] = scale
    ref = pipe(", ".join(PHRASES), **kwargs).images
    if family == "flux":
        from diffusers import FluxPipeline

        x = FluxPipeline._pack_latents(x, 1, 4, 16, 16)  # the pipeline's latents are packed 2×2 patches
    assert torch.equal(x, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_forward_equals_unhooked_and_branches_equal_single_runs(pipes, family):
    pipe = pipes[family]
    cond = _conditioning(pipe, family)
    den = Denoiser(pipe, guidance_scale=3.0)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    timestep = den.timestep(0.6)
    site = BLOCKS[family]
    with torch.no_grad():
        plain = den.branches(x, timestep, cond)
        with capture(den, site) as batched:
            hooked = den.branches(x, timestep, cond)
        single = {}
        for branch in ("uncond", "cond"):
            with capture(den, site) as cap:
                out = den.predict(x, timestep, cond, branch=branch)
            assert torch.allclose(out, plain[branch], atol=1e-5, rtol=1e-5)  # batch 2 vs 4: rounding only
            single[branch] = cap.store.get(site, branch=branch)
    for key in plain:
        assert torch.equal(hooked[key], plain[key]), key
    for branch in ("uncond", "cond"):
        got = batched.store.get(site, branch=branch)
        assert got.shape[0] == 2
        assert torch.allclose(got, single[branch], atol=1e-5, rtol=1e-5), branch  # batch 4 vs 2: rounding only
    # the two branches differ, so a swap or a merge could not pass the check above
    assert not torch.allclose(single["uncond"], single["cond"], atol=1e-3)


def test_families_take_their_own_call_layout(pipes):
    dens = {f: Denoiser(pipes[f]) for f in FAMILIES}
    assert {f: d.family for f, d in dens.items()} == {
        "sd15": "unet", "sd2": "unet", "pixart": "pixart", "dit": "dit", "sd3": "sd3", "flux": "flux"}
    assert dens["dit"].adapter.cfg_order == ("cond", "uncond")  # DiTPipeline stacks [cond; null class]
    assert dens["flux"].in_channels == 4 and dens["flux"].schedule.kind == "flow"
    assert dens["sd3"].prediction_type == "flow" and dens["sd2"].prediction_type == "v_prediction"
    with pytest.raises(TypeError, match="class-conditional: use interp.models.class_conditioning"):
        prompt_conditioning(pipes["dit"], PHRASES)
    assert torch.equal(class_conditioning(pipes["dit"], "red cube").tokens, torch.tensor([[2.0]]))
    with pytest.raises(ValueError, match="unknown class 'unicorn'"):
        class_conditioning(pipes["dit"], "unicorn")
    import probes

    with pytest.raises(TypeError, match="discrete class id: a derivative with respect to it is undefined"):
        probes.conditional_locality(dens["dit"], class_conditioning(pipes["dit"], 1), t=[0.5], seeds=1)
    dit_ablation = probes.conditional_locality(dens["dit"], class_conditioning(pipes["dit"], 1), t=[0.5], seeds=1,
                                               maps=("ablation",), shape=(4, 16, 16))
    assert dit_ablation["ablation"].shape == (1, 1, 16, 16) and float(dit_ablation["ablation"].max()) > 0
    with pytest.raises(ValueError, match="unknown family 'sd4'; choose one of"):
        tiny("sd4")
    with pytest.raises(TypeError, match="Denoiser wraps an nn.Module or a diffusers pipeline"):
        Denoiser(object())


def test_phrases_own_their_tokens_in_every_encoder(pipes):
    sd3 = prompt_conditioning(pipes["sd3"], PHRASES)
    # CLIP: BOS at 0, "a red cube" = 3 tokens; T5 after the 77 CLIP positions, no BOS.
    assert sd3.token_indices(0).tolist() == [1, 2, 3, 77, 78, 79]
    tok = pipes["sd3"].tokenizer_3
    assert tok.convert_ids_to_tokens(tok(", ".join(PHRASES)).input_ids)[4:7] == ["▁a", "▁blue", "▁sphere"]
    assert sd3.token_indices(1).tolist()[3:] == [81, 82, 83]
    pixart = prompt_conditioning(pipes["pixart"], PHRASES)
    assert pixart.tokens.shape[0] == 8 and pixart.owner.tolist() == [0, 0, 0, -1, 1, 1, 1, -1]  # ',' and EOS
    flux = prompt_conditioning(pipes["flux"], PHRASES)
    assert flux.tokens.shape == (512, 32) and set(flux.added) == {"pooled_projections"}
    with pytest.raises(ValueError, match="does not start and end on token boundaries"):
        prompt_conditioning(pipes["sd15"], PHRASES, sep="")  # "cubea" is one word to CLIP: no boundary to split at
    dropped = flux.drop(0)
    assert dropped.tokens.shape[0] == 509 and torch.equal(dropped.added["pooled_projections"], flux.added["pooled_projections"])


@pytest.mark.parametrize("family", FAMILIES)
def test_load_model_recognises_each_familys_folder(pipes, family, tmp_path):
    from interp.models.registry import load_model

    pipes[family].save_pretrained(tmp_path / family)
    loaded = load_model(tmp_path / family)
    assert loaded.family == {"sd15": "sd", "sd2": "sd"}.get(family, family)
    assert type(loaded.pipeline) is type(pipes[family])
    den, ref = loaded.denoiser, Denoiser(pipes[family])
    cond = _conditioning(loaded.pipeline, family)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(den(x, den.timestep(0.5), cond), ref(x, ref.timestep(0.5), cond))
    assert load_model(f"tiny-{family}").family == loaded.family


def test_load_model_refuses_an_unsupported_pipeline_folder(tmp_path):
    from interp.models.registry import load_model

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="holds a KandinskyPipeline pipeline, which scorescope does not support"):
        load_model(tmp_path / "m")


def _pipeline_call(pipe, family, cond_scale, steps, **extra):
    gen = torch.Generator().manual_seed(7)
    if family == "dit":
        return pipe(class_labels=[2], num_inference_steps=steps, generator=gen, guidance_scale=cond_scale, **extra)
    kwargs = dict(num_inference_steps=steps, generator=gen, output_type="latent", height=32, width=32, **extra)
    if family == "pixart":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    if cond_scale is not None:
        kwargs["guidance_scale"] = cond_scale
    return pipe(", ".join(PHRASES), **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_capturing_a_pipeline_labels_steps_and_branches_by_the_familys_layout(pipes, family):
    """capture(pipe) during the family's own pipeline == capture(den) during interp.sample (labelled by construction).

    interp.sample equals the pipeline bit for bit (above) and the Denoiser's batched branches equal single-branch
    runs (above), so equal stores mean the pipeline's branches are neither swapped nor merged.
    """
    pipe = pipes[family]
    cond = _conditioning(pipe, family)
    scale = None if family == "flux" else 4.0
    site = BLOCKS[family]
    with torch.no_grad(), capture(pipe, site) as from_pipe:
        _pipeline_call(pipe, family, scale, 2)
    den = Denoiser(pipe, guidance_scale=scale)
    with torch.no_grad(), capture(den, site) as from_den:
        sample(den, cond, shape=(1, 4, 16, 16), num_steps=2, seed=7)
    branches = ("cond",) if scale is None else ("uncond", "cond")
    keys = {(k.step, k.branch) for k in from_pipe.store.keys()}
    assert keys == {(s, b) for s in (0, 1) for b in branches}
    for step in (0, 1):
        for branch in branches:
            assert torch.equal(from_pipe.store.get(site, step=step, branch=branch),
                               from_den.store.get(site, step=step, branch=branch)), (step, branch)


def test_flux_true_cfg_calls_are_labelled_cond_then_uncond(pipes):
    pipe = pipes["flux"]
    cond = _conditioning(pipe, "flux")
    site = BLOCKS["flux"]
    with torch.no_grad(), capture(pipe, site) as from_pipe:
        ref = _pipeline_call(pipe, "flux", None, 2, negative_prompt="", true_cfg_scale=2.0).images
    den = Denoiser(pipe, guidance_scale=2.0, cfg_mode="separate")
    with torch.no_grad(), capture(den, site) as from_den:
        x = sample(den, cond, shape=(1, 4, 16, 16), num_steps=2, seed=7)
    from diffusers import FluxPipeline

    assert torch.equal(FluxPipeline._pack_latents(x, 1, 4, 16, 16), ref)
    for step in (0, 1):
        for branch in ("uncond", "cond"):
            assert torch.equal(from_pipe.store.get(site, step=step, branch=branch),
                               from_den.store.get(site, step=step, branch=branch)), (step, branch)


def test_heun_steps_are_scheduler_steps_not_network_calls():
    from diffusers import HeunDiscreteScheduler

    pipe = tiny("sd15", 0)
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    site = BLOCKS["sd15"]
    with torch.no_grad(), capture(pipe, site) as from_pipe:
        _pipeline_call(pipe, "sd15", None, 3)
    calls = sorted({(k.call, k.step) for k in from_pipe.store.keys()})
    assert [s for _, s in calls] == [0, 0, 1, 1, 2]  # 5 calls: predictor + corrector per step, the last first-order
    den = Denoiser(pipe)
    with torch.no_grad(), capture(den, site) as from_den:
        sample(den, prompt_conditioning(pipe, PHRASES), shape=(1, 4, 16, 16), num_steps=3, seed=7,
               scheduler=pipe.scheduler)
    assert [s for _, s in sorted({(k.call, k.step) for k in from_den.store.keys()})] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_mode_equals_reverse_mode_with_the_models_own_processors(pipes, family):
    """u·(J v) by torch.func.jvp (math SDPA kernel, processors untouched) equals (Jᵀ u)·v by reverse mode."""
    from interp.forward_mode import forward_mode_ready

    pipe = pipes[family]
    cond = _conditioning(pipe, family)
    den = Denoiser(pipe)
    g = torch.Generator().manual_seed(3)
    x, v, u = (torch.randn(1, 4, 16, 16, generator=g) for _ in range(3))
    timestep = den.timestep(0.5)
    def processors():
        return {name: m.processor for name, m in den.unet.named_modules() if hasattr(m, "processor")}

    procs = processors()
    assert procs

    def f(inp):
        return den.predict(inp, timestep, cond)

    with forward_mode_ready(den.unet):
        assert all(p is procs[k] for k, p in processors().items())  # nothing swapped
        _, jv = torch.func.jvp(f, (x,), (v,))
    _, pullback = torch.func.vjp(f, x)
    (jtu,) = pullback(u)
    forward, reverse = float((u * jv).sum().detach()), float((jtu * v).sum().detach())
    assert abs(forward - reverse) <= 1e-4 * max(1.0, abs(reverse)) and abs(reverse) > 1e-3
    if family != "dit":  # along the conditioning tokens too (DiT's token is a discrete class id)
        w = torch.randn(cond.tokens.shape, generator=g)
        ut = torch.randn(1, 4, 16, 16, generator=g)

        def h(tokens):
            return den.predict(x, timestep, cond.with_tokens(tokens))

        with forward_mode_ready(den.unet):
            _, jw = torch.func.jvp(h, (cond.tokens,), (w,))
        _, pb = torch.func.vjp(h, cond.tokens)
        fw, rv = float((ut * jw).sum().detach()), float((pb(ut)[0] * w).sum().detach())
        assert abs(fw - rv) <= 1e-4 * max(1.0, abs(rv)) and abs(rv) > 1e-4
    assert all(p is procs[k] for k, p in processors().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_writes_the_image_stream_of_the_chosen_branch_only(pipes, family):
    """Patch the cond branch of a corrupted run from a clean run: cond becomes clean, uncond stays corrupted."""
    import interventions as iv

    pipe = pipes[family]
    den = Denoiser(pipe, guidance_scale=3.0)
    clean = _conditioning(pipe, family)
    with torch.no_grad():
        other = class_conditioning(pipe, 5) if family == "dit" else prompt_conditioning(pipe, ["a dog"])
    site, x, ts = BLOCKS[family], torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)), None
    ts = den.timestep(0.7)
    with torch.no_grad():
        with capture(den, site) as cap_clean:
            den(x, ts, clean)
        with capture(den, site) as cap_other:
            corrupted = den(x, ts, other)
        with iv.apply(den, iv.Patch(site, source=iv.FromStore(cap_clean.store), branch="cond")), \
                capture(den, site) as cap_patched:
            patched = den(x, ts, other)
        with iv.apply(den, iv.Patch(site, source=iv.FromStore(cap_other.store))):
            same = den(x, ts, other)
    assert torch.equal(same, corrupted)  # a run patched with its own activations is unchanged
    assert torch.equal(cap_patched.store.get(site, branch="cond"), cap_clean.store.get(site, branch="cond"))
    assert torch.equal(cap_patched.store.get(site, branch="uncond"), cap_other.store.get(site, branch="uncond"))
    assert not torch.equal(patched, corrupted)


@pytest.mark.parametrize("family", FAMILIES)
def test_locality_probes_run_on_every_family_and_their_modes_agree(pipes, family):
    import probes

    pipe = pipes[family]
    den, cond = Denoiser(pipe), _conditioning(pipe, family)
    k = cond.k
    if family != "dit":  # DiT's class id has no derivative (refused, tested above); its ablation map is below
        kw = dict(t=[0.5], seeds=1, shape=(4, 16, 16), maps=("jvp", "ablation"), directions=4)
        fwd = probes.conditional_locality(den, cond, mode="forward", **kw)
        rev = probes.conditional_locality(den, cond, mode="reverse", **kw)
        assert fwd["jvp"].shape == (1, k, 16, 16) and float(fwd["jvp"].min()) >= 0 and float(fwd["jvp"].max()) > 0
        assert torch.allclose(fwd["jvp"], rev["jvp"], rtol=1e-3, atol=1e-6)
        assert float(fwd["ablation"].max()) > 0  # dropping a phrase's own tokens changes the prediction
    pix = probes.pixel_locality(den, cond, t=[0.5], seeds=1, pixels=[(5, 9)], shape=(4, 16, 16))
    G = pix["G"]
    assert G.shape[-2:] == (16, 16) and torch.isfinite(G).all() and float(G[..., 5, 9].min()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_nnsight_capture_equals_torch_capture(pipes, family):
    """The nnsight backend labels a family's branches (DiT: [cond; uncond]) and streams as the torch hooks do."""
    from interp.capture import capture_run

    pipe = pipes[family]
    cond = _conditioning(pipe, family)
    den = Denoiser(pipe, guidance_scale=3.0)
    site = BLOCKS[family]

    def run():
        return sample(den, cond, shape=(1, 4, 16, 16), num_steps=2, seed=5)

    with torch.no_grad():
        torch_cap, a = capture_run(den, site, run)
        nn_cap, b = capture_run(den, site, run, backend="nnsight", calls=2, count_steps=True)
    assert torch.equal(a, b)
    keys = sorted((k.step, k.branch) for k in torch_cap.store.keys())
    assert keys == sorted((k.step, k.branch) for k in nn_cap.store.keys()) and len(keys) == 4
    for step, branch in keys:
        assert torch.equal(torch_cap.store.get(site, step=step, branch=branch),
                           nn_cap.store.get(site, step=step, branch=branch)), (step, branch)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_plans_size_each_familys_calls(pipes, family):
    """plan_capture's shape-only pass (fake tensors, through the adapter) predicts the bytes a capture stores."""
    from interp.capture import plan_capture

    pipe = pipes[family]
    den = Denoiser(pipe, guidance_scale=3.0)
    cond = _conditioning(pipe, family)
    site = BLOCKS[family]
    tokens = 1 if family == "dit" else (cond.tokens.shape[0])
    plan = plan_capture(den, site, sample_shape=(2, 4, 16, 16), tokens_shape=(2, tokens, cond.tokens.shape[1]), calls=2)
    with torch.no_grad(), capture(den, site) as cap:
        sample(den, cond, shape=(1, 4, 16, 16), num_steps=2, seed=0)
    stored = sum(cap.store[k].numel() * cap.store[k].element_size() for k in cap.store.keys())
    assert plan.total_bytes == stored > 0


@pytest.mark.parametrize("family", ["sd15", "sd2", "pixart"])
def test_distance_masked_cross_attention_on_cross_attention_families(pipes, family):
    """Radius beyond the image: bit-identical; radius 0: every conditioner token hidden = only context tokens."""
    import dataclasses

    import interventions as iv

    pipe = pipes[family]
    den = Denoiser(pipe)
    cond = dataclasses.replace(_conditioning(pipe, family), locations=torch.tensor([[0.25, 0.3], [0.7, 0.6]]))
    context_only = dataclasses.replace(cond, null_tokens=None).subset([])  # the prompt's tokens minus both phrases
    x, ts = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6)), den.timestep(0.5)
    with torch.no_grad():
        ref = den(x, ts, cond)
        with iv.apply(den, iv.MaskCrossAttention("*attn2", radius=2.0)):
            wide = den(x, ts, cond)
        with iv.apply(den, iv.MaskCrossAttention("*attn2", radius=0.0)):
            zero = den(x, ts, cond)
        without = den(x, ts, context_only)
    assert torch.equal(wide, ref)
    assert torch.allclose(zero, without, atol=1e-5) and not torch.allclose(zero, ref, atol=1e-3)


def test_readme_transformer_snippet_runs_as_written():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Transformer families and flow matching", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    cap, latents = scope["cap"], scope["latents"]
    assert latents.shape == (1, 4, 16, 16)
    assert cap.store.get("transformer_blocks.0", step=0, branch="cond").shape == (1, 64, 16)     # image tokens
    assert cap.store.get("transformer_blocks.0.attn", step=0, branch="cond").shape[1] == 77 + 256  # text tokens


def test_an_explicit_batched_layout_follows_the_familys_order(pipes):
    """cfg='batched' on DiT's own pipeline labels its [cond; null] halves as DiT stacks them."""
    pipe = pipes["dit"]
    site = BLOCKS["dit"]
    with torch.no_grad(), capture(pipe, site) as auto:
        _pipeline_call(pipe, "dit", 4.0, 1)
    with torch.no_grad(), capture(pipe, site, cfg="batched") as explicit:
        _pipeline_call(pipe, "dit", 4.0, 1)
    for branch in ("uncond", "cond"):
        assert torch.equal(auto.store.get(site, step=0, branch=branch), explicit.store.get(site, step=0, branch=branch))
    assert not torch.equal(auto.store.get(site, step=0, branch="cond"), auto.store.get(site, step=0, branch="uncond"))


@pytest.mark.parametrize("family", ["sd15", "dit", "sd3"])
def test_patching_a_familys_own_pipeline_touches_the_chosen_branch_and_step_only(pipes, family):
    """iv.apply on a raw pipeline run: its steps and branches come from the scheduler and the family's layout."""
    import interventions as iv

    pipe = pipes[family]
    site = BLOCKS[family]
    with torch.no_grad(), capture(pipe, site) as plain:
        _pipeline_call(pipe, family, 4.0, 2)
    with torch.no_grad(), iv.apply(pipe, iv.Patch(site, iv.Zero(), steps=[1], branch="cond")) as applied, \
            capture(pipe, site) as patched:
        _pipeline_call(pipe, family, 4.0, 2)
    assert torch.equal(patched.store.get(site, step=0, branch="cond"), plain.store.get(site, step=0, branch="cond"))
    assert torch.equal(patched.store.get(site, step=1, branch="uncond"), plain.store.get(site, step=1, branch="uncond"))
    assert float(patched.store.get(site, step=1, branch="cond").abs().max()) == 0
    assert applied.frame()[["step", "branch"]].values.tolist() == [[1, "cond"]]


def test_the_nnsight_pipeline_front_end_refuses_transformer_pipelines_with_the_fix(pipes):
    from interp.nnsight_backend import capture_pipeline_nnsight

    with pytest.raises(TypeError, match=r"use capture_run\(interp.Denoiser\(pipe\), sites, run, backend='nnsight'"):
        capture_pipeline_nnsight(pipes["sd3"], "transformer_blocks.0", "a red cube", num_inference_steps=1)


def test_sd3_with_a_dynamically_shifted_scheduler_samples_like_its_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny("sd3", 0)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True)
    cond = _conditioning(pipe, "sd3")
    x = sample(Denoiser(pipe, guidance_scale=4.0), cond, shape=(1, 4, 16, 16), num_steps=3, seed=7)
    ref = _pipeline_call(pipe, "sd3", 4.0, 3).images
    assert torch.equal(x, ref)


@pytest.mark.parametrize("model, probe", [("tiny-sd3", "cond"), ("tiny-pixart", "cond"), ("tiny-sd15", "pixel"),
                                          ("tiny-dit", "pixel")])
def test_locality_commands_run_on_family_names_with_their_default_conditioning(tmp_path, model, probe):
    """`scorescope locality pixel|cond --model tiny-<family>`: the registry builds the family's own conditioning
    (phrases through prompt_conditioning; DiT a class), not SDXL's."""
    import json

    from typer.testing import CliRunner

    from scorescope.cli import app

    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["locality", probe, "--model", model, "--t", "0.5", "--seeds", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["metadata"]["model"] == model
    if probe == "cond":  # one conditioner per default phrase
        assert data["metadata"]["k"] == 2


def test_default_conditioning_of_a_loaded_model_follows_its_family():
    from interp.models.registry import DEFAULT_PHRASES, load_model

    sd3 = load_model("tiny-sd3")
    assert sd3.conditioning().labels == DEFAULT_PHRASES
    assert load_model("tiny-dit").conditioning(phrases=["3"]).tokens.item() == 3
    with pytest.raises(ValueError, match="locations are for CLEVR"):
        sd3.conditioning(locations=[[0.5, 0.5]])
    assert load_model("tiny-clevr").conditioning().k == 3
