"""Activation patching through nnsight (``interventions.patch_nnsight``) gives the same bits as the raw-hook
backend (``interventions.apply``) with the same Patch, fires at the same (site, step, branch), and leaves the
model clean (no hooks, no nnsight controllers, clean output)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import interventions as iv
from interp import count_hooks, sample
from interp.nnsight_backend import instrumented, is_instrumented

ATTN2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"  # (B, N, C) tokens on a 16x16 grid


def _clean(den) -> bool:
    return count_hooks(den.unet) == 0 and not is_instrumented(den.unet) and all(
        "forward" not in m.__dict__ for m in den.unet.modules())


def _fired(applied) -> list[tuple]:
    return sorted(map(tuple, applied.frame()[["edit", "site", "step", "branch", "calls", "rows"]].values.tolist()))


def test_zero_patch_of_a_single_denoiser_call_matches_apply(clevr):
    """(a) One Denoiser call, Zero() at mid_block; (c) afterwards no hooks/controllers and the clean output."""
    pipe, _, cond = clevr
    den = pipe.denoiser()  # no guidance: one "cond" call, as den.predict makes
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    edit = iv.Patch("mid_block", iv.Zero())
    with torch.no_grad():
        clean = den.predict(x, 500, cond)
        with iv.apply(den, edit) as ref:
            want = den.predict(x, 500, cond)
        applied, got = iv.patch_nnsight(den, edit, lambda: den.predict(x, 500, cond), calls=1)
        after = den.predict(x, 500, cond)
    assert not torch.equal(want, clean)  # the patch did something
    assert torch.equal(got, want)
    assert _fired(applied) == _fired(ref) == [(0, "mid_block", -1, "cond", 1, 2)]
    assert _clean(den) and torch.equal(after, clean)


def test_from_store_patch_in_a_guided_sampling_loop_matches_apply(clevr):
    """(b) 3-step sample, batched CFG (scale 3), FromStore of a clean source run at attn2, step 1, cond only."""
    pipe, _, cond = clevr
    den = pipe.denoiser(guidance_scale=3.0, cfg_mode="batched")
    other = pipe.conditioning([[0.5, 0.5]])
    run = lambda c: sample(den, c, shape=(2, 3, 32, 32), num_steps=3, seed=0)  # noqa: E731
    with iv.record(den, ATTN2) as rec:
        run(other)  # the clean source run
    edit = iv.Patch(ATTN2, iv.FromStore(rec.store), steps={1}, branch="cond")
    clean = run(cond)
    with iv.apply(den, edit) as ref:
        want = run(cond)
    applied, got = iv.patch_nnsight(den, edit, lambda: run(cond), calls=3, count_steps=True)
    assert not torch.equal(want, clean)
    assert torch.equal(got, want)
    assert _fired(applied) == _fired(ref) == [(0, ATTN2, 1, "cond", 1, 2)]
    assert _clean(den) and torch.equal(run(cond), clean)


def test_fn_region_channels_output_and_separate_cfg_match_apply_with_a_held_wrapper(clevr):
    """Fn and Zero with region/channels (a token map and a feature map), a Patch of the U-Net output, separate CFG
    calls (uncond/cond alternate); two runs reuse one nnsight wrapper."""
    pipe, _, cond = clevr
    den = pipe.denoiser(guidance_scale=3.0, cfg_mode="separate")

    def double(act, call):
        return act * 2.0

    edits = [iv.Patch(ATTN2, iv.Fn(double), region=(0.0, 0.5, 0.5, 1.0), channels=[1, 3], branch="uncond"),
             iv.Patch("mid_block", iv.Zero(), channels=slice(0, 8), steps=[0, 2]),
             iv.Patch("output", iv.Fn(double), steps=2, branch="cond")]
    run = lambda: sample(den, cond, shape=(1, 3, 32, 32), num_steps=3, seed=1)  # noqa: E731
    clean = run()
    with iv.apply(den, edits) as ref:
        want = run()
    with instrumented(den.unet) as held:
        for _ in range(2):
            applied, got = iv.patch_nnsight(den, edits, run, calls=6, count_steps=True, envoy=held)
            assert torch.equal(got, want)
            assert _fired(applied) == _fired(ref)
    assert not torch.equal(want, clean)
    assert {(s, b) for _, site, s, b, _, _ in _fired(ref) if site == ATTN2} == {(0, "uncond"), (1, "uncond"), (2, "uncond")}
    assert _clean(den) and torch.equal(run(), clean)


def test_refusals_are_clear_and_leave_the_model_clean(clevr):
    pipe, _, cond = clevr
    den = pipe.denoiser()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    run = lambda: den.predict(x, 500, cond)  # noqa: E731
    with pytest.raises(NotImplementedError, match="MaskCrossAttention.*interventions.apply"):
        iv.patch_nnsight(den, iv.MaskCrossAttention("*attn2", radius=0.1), run)
    with pytest.raises(NotImplementedError, match="Compose.*interventions.apply"):
        iv.patch_nnsight(den, [iv.Patch("mid_block"), iv.ComposeScores(0.2)], run)
    with pytest.raises(TypeError, match="patches"):
        iv.patch_nnsight(den, "mid_block", run)
    with pytest.raises(ValueError, match="calls"):
        iv.patch_nnsight(den, iv.Patch("mid_block"), run, calls=0)
    with iv.apply(den, iv.Patch("mid_block")), pytest.raises(iv.EditConflictError):
        iv.patch_nnsight(den, iv.Patch("mid_block"), run)
    with pytest.raises(RuntimeError, match="calls=2 was declared but the run made 1"):
        iv.patch_nnsight(den, iv.Patch("mid_block"), run, calls=2)
    with iv.record(den, "mid_block") as rec, torch.no_grad():
        run()  # captured outside a sampling loop: step -1 only
    with pytest.raises(KeyError, match="nothing for site 'mid_block' at step 0"):  # raised inside the trace
        iv.patch_nnsight(den, iv.Patch("mid_block", iv.FromStore(rec.store)), count_steps=True,
                         run=lambda: sample(den, cond, shape=(1, 3, 32, 32), num_steps=2))
    assert _clean(den)
    # the conflict claim was released: a later apply block may edit mid_block again
    with iv.apply(den, iv.Patch("mid_block")):
        pass


def test_interventions_import_does_not_import_nnsight():
    code = "import sys, interventions; print('nnsight' in sys.modules)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
