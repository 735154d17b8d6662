"""Capture: bit-identical hooked forwards, hook hygiene on every exit path, labels, budgets, streaming."""

from __future__ import annotations

import json

import pytest
import torch

from interp import Site, count_hooks, sample
from interp.capture import CaptureBudgetError, capture, plan_capture, read_activation
from interp.models import prompt_conditioning, sdxl_denoiser
from interp.store import ShardedStore, open_store

SITE_PATTERNS = ["*attn2", "mid_block", "up_blocks.0.attentions.1", "*.transformer_blocks.0", "conv_out", "down_blocks.?"]


@pytest.fixture()
def sdxl(tiny_sdxl_pipe):
    cond = prompt_conditioning(tiny_sdxl_pipe, ["a red cube", "a blue sphere"])
    return tiny_sdxl_pipe, sdxl_denoiser(tiny_sdxl_pipe, guidance_scale=5.0), cond


def test_hooked_forward_is_bit_identical(sdxl):
    pipe, den, cond = sdxl
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = den(x, 500, cond)
        with capture(den, SITE_PATTERNS) as cap:
            hooked = den(x, 500, cond)
    assert torch.equal(ref, hooked)
    assert len(cap.store) > 20
    assert count_hooks(pipe.unet) == 0


def test_hooked_pipeline_sampling_is_bit_identical(sdxl):
    pipe, _, _ = sdxl

    def run():
        return pipe("a red cube", num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    with torch.no_grad():
        ref = run()
        with capture(pipe, ["*attn2", "mid_block"]) as cap:
            hooked = run()
    assert torch.equal(ref, hooked)
    f = cap.frame()
    assert sorted(f.step.unique().tolist()) == [0, 1, 2]
    assert set(f.branch) == {"uncond", "cond"}
    assert (f.groupby(["site", "step", "branch"]).size() == 1).all()


@pytest.mark.parametrize("pattern", SITE_PATTERNS)
def test_no_hook_survives_an_exception(sdxl, pattern):
    pipe, den, cond = sdxl
    x = torch.randn(1, 4, 32, 32)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(den, pattern):
            den(x, 10, cond)
            raise RuntimeError("boom")
    assert count_hooks(pipe.unet) == 0

    class Boom(Exception):
        pass

    def explode(module, args, out):
        raise Boom

    # An exception raised *inside* the forward (here by another hook) also leaves nothing behind.
    with pytest.raises(Boom):
        with capture(den, pattern):
            handle = pipe.unet.conv_out.register_forward_hook(explode)
            try:
                den(x, 10, cond)
            finally:
                handle.remove()
    assert count_hooks(pipe.unet) == 0


def test_bad_site_fails_before_any_hook_is_installed(sdxl):
    pipe, den, _ = sdxl
    with pytest.raises(LookupError, match="Closest real paths"):
        with capture(den, ["mid_block", "up_blocks.9"]):
            pass
    assert count_hooks(pipe.unet) == 0


def test_sampling_labels_steps_and_branches(sdxl):
    pipe, den, cond = sdxl
    with torch.no_grad(), capture(den, [Site("mid_block", steps=[1, 3], branch="cond"), "conv_out"]) as cap:
        sample(den, cond, shape=(2, 4, 32, 32), num_steps=4, scheduler="euler")
    mids = cap.store.find("mid_block")
    assert [(k.step, k.branch) for k in mids] == [(1, "cond"), (3, "cond")]
    outs = cap.store.stack("conv_out", branch="uncond")
    assert outs.shape == (4, 2, 4, 32, 32)


def test_captured_values_equal_differentiable_read(sdxl):
    pipe, den, cond = sdxl
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    den_c = sdxl_denoiser(pipe, guidance_scale=None)
    with torch.no_grad(), capture(den_c, "mid_block") as cap:
        den_c(x, 250, cond)
    h = read_activation(den_c, "mid_block", x.requires_grad_(True), 250, cond)
    assert torch.equal(h.detach(), cap.store.get("mid_block"))
    (g,) = torch.autograd.grad(h.sum(), x)
    assert g.abs().sum() > 0


def test_read_activation_composes_with_torch_func(tiny_clevr_pipe):
    den = tiny_clevr_pipe.denoiser()
    cond = tiny_clevr_pipe.conditioning([[0.3, 0.6]])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v = torch.randn_like(x)
    unet64 = den.unet.double()
    try:
        f = lambda inp: read_activation(den, "down_blocks.1", inp, 100, cond.to(dtype=torch.float64))  # noqa: E731
        h, vjp_fn = torch.func.vjp(f, x)
        u = torch.randn_like(h)
        (g,) = vjp_fn(u)
        eps = 1e-5
        fd = ((f(x + eps * v) - f(x - eps * v)) / (2 * eps) * u).sum()
        assert torch.allclose((g * v).sum(), fd, rtol=1e-6)
        assert count_hooks(den.unet) == 0
    finally:
        unet64.float()


def test_budget_refuses_with_the_number_before_running(sdxl):
    pipe, den, cond = sdxl
    plan = plan_capture(den, "*attn2", sample_shape=(4, 4, 32, 32), calls=30)
    assert plan.total_bytes == 12 * 30 * 4 * 256 * 64 * 4
    calls = []
    with pytest.raises(CaptureBudgetError, match=r"would need 90\.0 MiB"):
        with capture(den, "*attn2", budget="10MiB", on_over_budget="raise", plan=plan) as cap:
            calls.append(1)
    assert calls == [] and count_hooks(pipe.unet) == 0
    with pytest.raises(CaptureBudgetError, match="has reached"):
        with torch.no_grad(), capture(den, "*attn2", budget=200_000, on_over_budget="raise"):
            den(torch.randn(2, 4, 32, 32), 10, cond)
    assert count_hooks(pipe.unet) == 0


def test_over_budget_streams_to_disk_and_keeps_everything(sdxl, tmp_path):
    pipe, den, cond = sdxl
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with capture(den, "*attn2") as ref:
            den(x, 10, cond)
        with capture(den, "*attn2", budget=300_000, spill_dir=tmp_path / "spill") as cap:
            den(x, 10, cond)
    assert isinstance(cap.store, ShardedStore)
    reopened = open_store(tmp_path / "spill")
    assert sorted(reopened.keys()) == sorted(ref.store.keys())
    for k in ref.store.keys():
        assert torch.equal(reopened[k], ref.store[k])


def test_streamed_store_writes_shards_atomically_and_reopens(sdxl, tmp_path):
    pipe, den, cond = sdxl
    with torch.no_grad(), capture(den, "*attn2", store=tmp_path / "acts", metadata={"seed": 7}) as cap:
        cap.store.shard_bytes = 200_000  # force several shards
        sample(den, cond, shape=(1, 4, 32, 32), num_steps=3, scheduler="euler")
    index = json.loads((tmp_path / "acts" / "index.json").read_text())
    assert index["closed"] and index["n_shards"] > 3 and index["n_tensors"] == 72
    assert index["metadata"]["seed"] == 7 and index["metadata"]["model"] == "sdxl"
    assert not list((tmp_path / "acts").glob(".*"))  # no temporary files left behind
    store = open_store(tmp_path / "acts")
    assert len(store) == 12 * 3 * 2
    assert store.get(store.keys()[0].site, step=2, branch="cond").shape == (1, 256, 64)
    with pytest.raises(FileExistsError, match="already holds"):
        ShardedStore(tmp_path / "acts")
    with pytest.raises(PermissionError):
        store.put(store.keys()[0], torch.zeros(1))


def test_a_crashed_stream_keeps_every_flushed_shard(tmp_path):
    """A writer killed mid-run (never closed) leaves a store that opens with everything it flushed."""
    from interp.store import ActivationKey

    store = ShardedStore(tmp_path / "crash", shard_bytes=1000)
    tensors = {ActivationKey("m", step, "cond", step): torch.full((100,), float(step)) for step in range(5)}
    for key, t in tensors.items():
        store.put(key, t)  # 400 bytes each: a shard is flushed every third tensor
    del store  # no close(): the buffered tail is lost, the flushed shards are not
    back = open_store(tmp_path / "crash")
    assert sorted(back.keys()) == sorted(tensors)[:3]
    assert all(torch.equal(back[k], tensors[k]) for k in back.keys())
