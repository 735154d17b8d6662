"""Parity of the two capture backends: plain torch hooks and nnsight 0.8 give the same bits.

Every comparison is ``torch.equal`` per ``ActivationKey(site, step, branch, call)``, after checking that
both stores hold exactly the same keys — so a mislabelled step or branch fails as surely as a wrong value.
The SDXL case runs the real diffusers pipeline (classic batched CFG) through nnsight's ``DiffusionModel``;
the CLEVR cases drive the U-Net through a :class:`~interp.Denoiser` in both CFG shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from interp import Site, count_hooks, sample  # noqa: E402
from interp.capture import CaptureBudgetError, capture, capture_run, unet_of  # noqa: E402
from interp.models import clevr_pipeline  # noqa: E402
from interp.models.sdxl import tiny_sdxl  # noqa: E402
from interp.store import ShardedStore  # noqa: E402

from interp import nnsight_backend  # noqa: E402

SDXL_SITES = ["*attn2", "mid_block"]
CLEVR_SITES = ["*attn2", "mid_block"]
LOCATIONS = [[0.2, 0.3], [0.7, 0.6]]


def assert_same_store(a, b) -> None:
    """Same keys, and bit-identical tensors under every key."""
    ka, kb = sorted(a.keys()), sorted(b.keys())
    assert ka == kb, f"keys differ: only torch {set(ka) - set(kb)}, only nnsight {set(kb) - set(ka)}"
    assert ka, "nothing was captured"
    for key in ka:
        ta, tb = a[key], b[key]
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, key
        assert torch.equal(ta, tb), f"{key}: max |diff| {(ta.float() - tb.float()).abs().max().item()}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the shared 2-core machine thrashes with more, and results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    """``(pipeline, DiffusionModel)``: the tiny SDXL pipeline, and nnsight's copy of it loaded from a saved folder."""
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    pipe = tiny_sdxl(0)
    pipe.save_pretrained(folder)
    return pipe, nnsight_backend.load_diffusion_model(folder)


@pytest.fixture(scope="module")
def clevr():
    pipe = clevr_pipeline("tiny", seed=0)
    return pipe, pipe.conditioning(LOCATIONS)


# --------------------------------------------------------------------------- SDXL pipeline


def test_sdxl_pipeline_cfg_parity_per_step_and_branch(sdxl_model) -> None:
    # Torch hooks on the original pipeline object, nnsight on the DiffusionModel's copy loaded from disk
    # (realigned by load_diffusion_model, so the copy computes the same bits).
    pipe, model = sdxl_model
    steps, images_per_prompt = 3, 2  # each call's batch is 2 branches x 2 images: never "batch 2"
    call = dict(num_inference_steps=steps, guidance_scale=5.0, num_images_per_prompt=images_per_prompt)
    extra = dict(output_type="latent", height=32, width=32)
    with capture(pipe, SDXL_SITES) as ref:
        want = pipe("a red cube", generator=torch.Generator().manual_seed(0), **call, **extra).images
    got_cap, got = nnsight_backend.capture_pipeline_nnsight(
        model, SDXL_SITES, "a red cube", **call,
        pipe_kwargs=dict(generator=torch.Generator().manual_seed(0), **extra),
    )
    assert_same_store(ref.store, got_cap.store)
    assert torch.equal(want, got.images)  # capturing changed nothing downstream

    keys = got_cap.store.keys()
    attn2 = [p for p, _ in unet_of(pipe).named_modules() if p.endswith("attn2")]
    assert {k.site for k in keys} == {*attn2, "mid_block"} and len(attn2) == 12
    assert {k.step for k in keys} == set(range(steps))
    assert {k.branch for k in keys} == {"uncond", "cond"}
    assert len(keys) == 13 * steps * 2
    for step in range(steps):
        uncond = got_cap.store.get("mid_block", step, "uncond")
        cond = got_cap.store.get("mid_block", step, "cond")
        assert uncond.shape[0] == cond.shape[0] == images_per_prompt  # halves of 2 x images, not "batch 2"
        assert not torch.equal(uncond, cond)  # the halves really are different branches


def test_call_layout_refuses_a_wrong_batch() -> None:
    # Declared layout: 1 prompt x 1 image per branch; a call with another batch must raise, not mislabel.
    layout = nnsight_backend.CallLayout(cfg="batched", count_steps=True, rows_per_branch=1)
    assert layout.label(3, 2) == (3, (("uncond", slice(0, 1)), ("cond", slice(1, 2))))
    with pytest.raises(RuntimeError, match="rows per branch"):
        layout.label(0, 4)
    with pytest.raises(ValueError, match="cannot hold 2 equal branches"):
        layout.label(0, 3)


# --------------------------------------------------------------------------- CLEVR U-Net


@pytest.mark.parametrize("cfg_mode", ["batched", "separate", None])
def test_clevr_single_denoiser_call_parity(clevr, cfg_mode: str | None) -> None:
    pipe, cond = clevr
    den = pipe.denoiser(guidance_scale=3.0 if cfg_mode else None, cfg_mode=cfg_mode or "batched")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    run = lambda: den(x, 500, cond)  # noqa: E731
    ref, want = capture_run(den, CLEVR_SITES, run, backend="torch")
    got, out = capture_run(den, CLEVR_SITES, run, backend="nnsight", calls=2 if cfg_mode == "separate" else 1)
    assert_same_store(ref.store, got.store)
    assert torch.equal(want, out)
    assert {k.step for k in got.store.keys()} == {-1}  # a lone call has no denoising step
    assert {k.branch for k in got.store.keys()} == ({"uncond", "cond"} if cfg_mode else {"cond"})
    assert all(got.store[k].shape[0] == 2 for k in got.store.keys())


@pytest.mark.parametrize("cfg_mode", ["batched", "separate"])
def test_clevr_sampling_parity(clevr, cfg_mode: str) -> None:
    pipe, cond = clevr
    den = pipe.denoiser(guidance_scale=3.0, cfg_mode=cfg_mode)
    run = lambda: sample(den, cond, shape=(2, 3, 32, 32), num_steps=3)  # noqa: E731
    ref, want = capture_run(den, CLEVR_SITES, run, backend="torch")
    got, out = capture_run(den, CLEVR_SITES, run, backend="nnsight", count_steps=True)
    assert_same_store(ref.store, got.store)
    assert torch.equal(want, out)
    assert got.calls == (6 if cfg_mode == "separate" else 3)
    assert {(k.step, k.branch) for k in got.store.keys()} == {(s, b) for s in range(3) for b in ("uncond", "cond")}


def test_clevr_site_selection_parity_and_streaming(clevr, tmp_path: Path) -> None:
    # Regions (feature map and token sequence), channels, step/branch filters and module inputs go
    # through the same Site.select path; the nnsight capture streams to safetensors shards.
    pipe, cond = clevr
    den = pipe.denoiser(guidance_scale=3.0, cfg_mode="batched")
    sites = [
        Site("mid_block", region=(0.0, 0.5, 0.25, 1.0), channels=[0, 3, 5]),
        Site("down_blocks.1.attentions.0.transformer_blocks.0.attn2", region=(0.5, 1.0, 0.0, 0.5)),
        Site("up_blocks.0.attentions.*.proj_in", io="input", steps=[0, 2], branch="cond"),
    ]
    run = lambda: sample(den, cond, shape=(2, 3, 32, 32), num_steps=3)  # noqa: E731
    ref, _ = capture_run(den, sites, run, backend="torch")
    got, _ = capture_run(den, sites, run, backend="nnsight", count_steps=True, calls=3,
                         store=tmp_path / "acts")
    assert isinstance(got.store, ShardedStore)
    back = ShardedStore.open(tmp_path / "acts")
    assert back.complete  # the nnsight capture closes the store it opened, as the torch capture does
    assert_same_store(ref.store, back)
    assert ref.store.get("mid_block", 1, "uncond").shape == (2, 3, 4, 6)  # 8x8 map, rows [0,4), cols [2,8)
    assert {k.step for k in ref.store.find("up_blocks.0.attentions.0.proj_in")} == {0, 2}


def test_held_envoy_is_reused_and_released(clevr) -> None:
    # One nnsight wrap for several captures; the model is clean again when the block ends.
    pipe, cond = clevr
    den = pipe.denoiser(guidance_scale=3.0, cfg_mode="batched")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ref, _ = capture_run(den, "mid_block", lambda: den(x, 700, cond), backend="torch")
    with nnsight_backend.instrumented(den.unet) as held:
        for _ in range(2):
            got, _ = nnsight_backend.capture_nnsight(den, "mid_block", lambda: den(x, 700, cond), calls=1, envoy=held)
            assert_same_store(ref.store, got.store)
        assert nnsight_backend.is_instrumented(den.unet)
    assert not nnsight_backend.is_instrumented(den.unet)
    assert all("forward" not in m.__dict__ for m in den.unet.modules())


def test_declared_call_count_is_checked(clevr) -> None:
    pipe, cond = clevr
    den = pipe.denoiser()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="calls=2 was declared but the run made 1"):
        nnsight_backend.capture_nnsight(den, "mid_block", lambda: den(x, 10, cond), calls=2)
    assert not nnsight_backend.is_instrumented(den.unet)


# --------------------------------------------------------------------------- cleanup on errors


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_state_removed_after_an_exception(clevr, backend: str) -> None:
    pipe, cond = clevr
    den = pipe.denoiser(guidance_scale=3.0, cfg_mode="separate")
    unet = den.unet
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = den(x, 300, cond)

    def run() -> None:
        den(x, 300, cond)  # two U-Net calls captured, then the run fails
        raise Boom("failed mid-run")

    with pytest.raises(Boom):
        capture_run(den, CLEVR_SITES, run, backend=backend)
    assert count_hooks(unet) == 0
    assert not nnsight_backend.is_instrumented(unet)
    assert all("forward" not in m.__dict__ for m in unet.modules())
    with torch.no_grad():
        assert torch.equal(den(x, 300, cond), before)


def test_state_removed_after_an_error_inside_the_trace(clevr) -> None:
    # The failure comes from the capture's own worker (budget refused) while nnsight is interleaving.
    pipe, cond = clevr
    den = pipe.denoiser()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = den(x, 300, cond)
    with pytest.raises(CaptureBudgetError):
        nnsight_backend.capture_nnsight(den, CLEVR_SITES, lambda: den(x, 300, cond), budget=1024,
                                        on_over_budget="raise")
    assert count_hooks(den.unet) == 0 and not nnsight_backend.is_instrumented(den.unet)
    with torch.no_grad():
        assert torch.equal(den(x, 300, cond), before)


def test_nnsight_is_not_imported_with_the_package() -> None:
    code = "import sys, interp, interp.capture, interp.store; print('nnsight' in sys.modules)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
