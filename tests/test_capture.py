"""Capture: bit-identical hooked forwards, hook hygiene on every exit path, labels, budgets, streaming."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from interp import Site, count_hooks, sample
from interp.capture import CaptureBudgetError, CaptureConflictError, capture, plan_capture, read_activation
from interp.models import prompt_conditioning, sdxl_denoiser
from interp.store import ActivationKey, IncompleteStoreWarning, MemoryStore, ShardedStore, open_store

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
    h = read_activation(den_c, "mid_block", cond, x_t=x.requires_grad_(True), timestep=250)
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
        f = lambda inp: read_activation(den, "down_blocks.1", cond.to(dtype=torch.float64), x_t=inp, timestep=100)  # noqa: E731
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
    with pytest.warns(IncompleteStoreWarning, match="never closed"):
        back = open_store(tmp_path / "crash")
    assert not back.complete
    assert sorted(back.keys()) == sorted(tensors)[:3]
    assert all(torch.equal(back[k], tensors[k]) for k in back.keys())


# --------------------------------------------------------------------------- concurrency, retries, aborts


@pytest.fixture()
def clevr(tiny_clevr_pipe):
    den = tiny_clevr_pipe.denoiser()  # no guidance: one U-Net call per step
    return den, tiny_clevr_pipe.conditioning([[0.3, 0.6]])


def _steps(cap) -> list[int]:
    return sorted(k.step for k in cap.store.find("mid_block"))


def test_two_threads_capture_only_their_own_forwards(clevr):
    """Each thread's capture records its own sampling run only, bit-identical to running it alone."""
    den, cond = clevr
    runs = {"a": (3, 0), "b": (2, 1)}  # (steps, seed)
    with torch.no_grad():
        alone = {}
        for name, (steps, seed) in runs.items():
            with capture(den, "mid_block") as cap:
                sample(den, cond, shape=(1, 3, 32, 32), num_steps=steps, seed=seed)
            alone[name] = cap
    barrier = threading.Barrier(2, timeout=60)
    got, errors = {}, []

    def worker(name: str) -> None:
        steps, seed = runs[name]
        try:
            with torch.no_grad(), capture(den, "mid_block") as cap:
                barrier.wait()  # both captures are active before either samples ...
                sample(den, cond, shape=(1, 3, 32, 32), num_steps=steps, seed=seed)
                barrier.wait()  # ... and stay active until both have finished sampling
            got[name] = cap
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(n,)) for n in runs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for name, (steps, _) in runs.items():
        assert _steps(got[name]) == list(range(steps)), name  # old code: both runs' calls in each store
        assert sorted(got[name].store.keys()) == sorted(alone[name].store.keys())
        for key in alone[name].store.keys():
            assert torch.equal(got[name].store[key], alone[name].store[key])
    assert count_hooks(den.unet) == 0


def test_interleaved_generator_captures_of_one_model_are_refused(clevr, tiny_sdxl_pipe):
    """Generators share their caller's context: a second capture of the same model is refused, clearly."""
    den, cond = clevr
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def run(target, inp, c, timestep):
        with torch.no_grad(), capture(target, "mid_block") as cap:
            yield cap
            target.predict(inp, timestep, c)
            yield cap

    first = run(den, x, cond, 10)
    cap1 = next(first)
    second = run(den, x, cond, 20)
    with pytest.raises(CaptureConflictError, match="already active in this thread"):
        next(second)
    # A capture of another model interleaves fine: each records its own forwards.
    sd_den = sdxl_denoiser(tiny_sdxl_pipe, guidance_scale=None)
    sd_cond = prompt_conditioning(tiny_sdxl_pipe, ["a red cube"])
    other = run(sd_den, torch.randn(1, 4, 32, 32), sd_cond, 30)
    cap2 = next(other)
    next(first)
    next(other)
    for gen in (first, other):
        with pytest.raises(StopIteration):
            next(gen)
    with torch.no_grad():
        want1 = read_activation(den, "mid_block", cond, x_t=x, timestep=10)
    assert [k.call for k in cap1.store.keys()] == [0] and torch.equal(cap1.store.get("mid_block"), want1)
    assert [k.call for k in cap2.store.keys()] == [0]
    assert count_hooks(den.unet) == 0 and count_hooks(tiny_sdxl_pipe.unet) == 0


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_a_retried_forward_is_a_new_call_in_both_stores(clevr, tmp_path, where):
    den, cond = clevr
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    failures = [RuntimeError("transient")]

    def flaky(module, args, out):  # fails the first forward after mid_block was already captured
        if failures:
            raise failures.pop()

    handle = den.unet.conv_out.register_forward_hook(flaky)
    try:
        with torch.no_grad(), capture(den, ["mid_block", "conv_out"],
                                      store="memory" if where == "memory" else tmp_path / "acts") as cap:
            with pytest.raises(RuntimeError, match="transient"):
                den.predict(x, 10, cond)
            out = den.predict(x, 10, cond)  # old code, disk: KeyError "already captured" from inside a hook
    finally:
        handle.remove()
    store = cap.store if where == "memory" else open_store(tmp_path / "acts")
    assert sorted((k.site, k.call) for k in store.keys()) == [("conv_out", 1), ("mid_block", 0), ("mid_block", 1)]
    assert cap.calls == 1 and cap.failed_calls == [0] and store.metadata["failed_calls"] == [0]
    assert store.complete
    with torch.no_grad(), capture(den, ["mid_block", "conv_out"]) as ref:
        den.predict(x, 10, cond)
    for site in ("mid_block", "conv_out"):  # the retry recorded the clean call's values
        assert torch.equal(store[ActivationKey(site, -1, "cond", 1)], ref.store[ActivationKey(site, -1, "cond", 0)])
    assert out.shape == x.shape


def test_a_store_passed_in_twice_continues_the_call_numbers(clevr):
    den, cond = clevr
    x = torch.randn(1, 3, 32, 32)
    store = MemoryStore()
    with torch.no_grad():
        for _ in range(2):
            with capture(den, "mid_block", store=store):
                den.predict(x, 10, cond)
    assert [k.call for k in store.find("mid_block")] == [0, 1]


def test_an_aborted_capture_keeps_its_data_and_says_it_is_partial(clevr, tmp_path):
    den, cond = clevr
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), capture(den, "mid_block", store=tmp_path / "bad") as bad:
            den.predict(x, 10, cond)
            raise RuntimeError("boom")
    index = json.loads((tmp_path / "bad" / "index.json").read_text())
    assert index["closed"] is False and index["aborted"] == "RuntimeError: boom" and index["n_tensors"] == 1
    with pytest.warns(IncompleteStoreWarning, match="aborted by RuntimeError: boom"):
        back = open_store(tmp_path / "bad")
    assert not back.complete and back.aborted == "RuntimeError: boom" and len(back) == 1
    assert not bad.store.complete
    # The same in memory, and for a store the caller passed in and closes later.
    with pytest.raises(KeyError):
        with torch.no_grad(), capture(den, "mid_block") as mem:
            den.predict(x, 10, cond)
            raise KeyError("gone")
    assert mem.store.aborted == "KeyError: 'gone'" and len(mem.store) == 1
    mine = ShardedStore(tmp_path / "mine")
    with pytest.raises(ValueError):
        with torch.no_grad(), capture(den, "mid_block", store=mine):
            raise ValueError("bad input")
    mine.close()
    assert json.loads((tmp_path / "mine" / "index.json").read_text())["closed"] is False
    # A clean exit: closed, complete, no warning.
    with torch.no_grad(), capture(den, "mid_block", store=tmp_path / "good"):
        den.predict(x, 10, cond)
    index = json.loads((tmp_path / "good" / "index.json").read_text())
    assert index["closed"] is True and "aborted" not in index
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_store(tmp_path / "good").complete


def test_a_module_run_twice_in_one_call_keeps_both_runs(clevr):
    """diffusers resnets apply one shared `nonlinearity` to the features and the time embedding (old: overwritten)."""
    den, cond = clevr
    path = "down_blocks.0.resnets.0.nonlinearity"
    with torch.no_grad(), capture(den, path) as cap:
        den.predict(torch.randn(1, 3, 32, 32), 10, cond)
    runs = sorted(cap.store.keys())
    assert [k.site for k in runs] == [path, f"{path}#1", f"{path}#2"] and {k.call for k in runs} == {0}
    # features after norm1 (B, C, h, w), the time embedding (B, C), features after norm2
    assert [cap.store[k].dim() for k in runs] == [4, 2, 4]


def test_two_sites_naming_one_module_are_refused(clevr):
    den, _ = clevr
    with pytest.raises(ValueError, match="'mid_block' is named by two sites"):
        capture(den, ["mid_block", Site("mid_block", branch="cond")]).__enter__()
    assert count_hooks(den.unet) == 0
