"""Activation patching: self-patching is the identity, patching the output reproduces the source run, and every
mismatch (shape, missing step/branch, ambiguous store, unknown site) is one clear error."""

from __future__ import annotations

import pytest
import torch

import interventions as iv
from interp import SiteError, sample

SITES = ["mid_block", "*attn2", "down_blocks.1.resnets.0", "output"]


def test_patching_a_run_with_its_own_activations_changes_nothing(clevr):
    """Over a whole guided sampling loop (batched [uncond; cond] calls), at blocks, attn2 and the output."""
    _, den, cond = clevr
    run = dict(shape=(2, 3, 32, 32), num_steps=3, seed=0, guidance_scale=2.0)
    with iv.record(den, SITES) as rec:
        reference = sample(den, cond, **run)
    with iv.apply(den, iv.Patch(SITES, iv.FromStore(rec.store))) as applied:
        patched = sample(den, cond, **run)
    assert torch.equal(patched, reference)
    fired = applied.frame()
    assert set(fired.branch) == {"cond", "uncond"} and set(fired.step) == {0, 1, 2}
    assert "output" in set(fired.site) and (fired.rows == 2).all()


def test_patching_the_output_yields_the_source_runs_output_exactly(clevr):
    pipe, den, cond = clevr
    other = pipe.conditioning([[0.5, 0.5]])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with iv.record(den, "output") as rec, torch.no_grad():
        source = den.predict(x, 500, other)
    with iv.apply(den, iv.Patch("output", iv.FromStore(rec.store))), torch.no_grad():
        got = den.predict(x.flip(0), 500, cond)  # another input and another conditioning
    assert torch.equal(got, source)
    # over a sampling loop: every step's prediction replaced -> the source run's final sample
    run = dict(shape=(1, 3, 32, 32), num_steps=3, seed=0)
    with iv.record(den, "output") as rec:
        source_x = sample(den, other, **run)
    with iv.apply(den, iv.Patch("output", iv.FromStore(rec.store))):
        assert torch.equal(sample(den, cond, **run), source_x)
    assert not torch.equal(sample(den, cond, **run), source_x)


def test_zero_region_and_channels_patch_only_what_they_select(clevr):
    _, den, cond = clevr
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    attn = "mid_block.attentions.0"  # (B, C, h, w) map
    attn2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"  # (B, N, C) tokens on a 16x16 grid, upstream

    def read(*edits):
        with iv.record(den, [attn, attn2]) as rec, iv.apply(den, *edits) if edits else _null(), torch.no_grad():
            den.predict(x, 500, cond)
        return rec.store.get(attn, -1), rec.store.get(attn2, -1)

    plain_map, plain_tok = read()
    edit_map = iv.Patch(attn, iv.Zero(), region=(0.0, 0.5, 0.5, 1.0), channels=[1, 3])
    edit_tok = iv.Patch(attn2, iv.Zero(), region=(0.0, 0.5, 0.5, 1.0), channels=[1, 3])
    (got_map,) = _patched_outputs(den, x, cond, [edit_map], [attn])  # one edit per run: each changes what follows
    (got_tok,) = _patched_outputs(den, x, cond, [edit_tok], [attn2])
    h, w = got_map.shape[-2:]
    sel = torch.zeros_like(got_map, dtype=torch.bool)
    sel[:, [1, 3], : h // 2, w // 2:] = True
    assert (got_map[sel] == 0).all() and torch.equal(got_map[~sel], plain_map[~sel])
    grid = got_tok.transpose(1, 2).reshape(1, -1, 16, 16)
    plain_grid = plain_tok.transpose(1, 2).reshape(1, -1, 16, 16)
    sel = torch.zeros_like(grid, dtype=torch.bool)
    sel[:, [1, 3], :8, 8:] = True
    assert (grid[sel] == 0).all() and torch.equal(grid[~sel], plain_grid[~sel])


def _null():
    import contextlib

    return contextlib.nullcontext()


def _patched_outputs(den, x, cond, edits, paths):
    box = {}
    hooks = []
    modules = dict(den.unet.named_modules())
    with iv.apply(den, *edits):
        for p in paths:  # registered after the patch hooks: they see the patched outputs
            hooks.append(modules[p].register_forward_hook(lambda m, a, o, p=p: box.__setitem__(p, (o[0] if isinstance(o, tuple) else o).clone())))
        try:
            with torch.no_grad():
                den.predict(x, 500, cond)
        finally:
            for h in hooks:
                h.remove()
    return [box[p] for p in paths]


def test_mean_and_fn_sources(clevr):
    _, den, cond = clevr
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with iv.record(den, "mid_block") as rec, torch.no_grad():
        den.predict(x, 500, cond)
        den.predict(x, 300, cond)
    stored = rec.store.stack("mid_block")  # (2 calls, B, C, h, w)
    mean = stored.double().mean((0, 1)).float()
    (got,) = _patched_outputs(den, x, cond, [iv.Patch("mid_block", iv.Mean(rec.store))], ["mid_block"])
    torch.testing.assert_close(got, mean.expand_as(got))
    seen = []

    def halve(act, call):
        seen.append((call.site, call.branch, call.step, len(call.conditionings)))
        return act * 0.5

    with iv.record(den, "mid_block") as plain, torch.no_grad():
        den.predict(x, 500, cond)
    (got,) = _patched_outputs(den, x, cond, [iv.Patch("mid_block", iv.Fn(halve))], ["mid_block"])
    assert torch.equal(got, plain.store.get("mid_block", -1) * 0.5)
    assert seen == [("mid_block", "cond", None, 2)]


def test_shape_mismatch_names_both_shapes_and_the_site(clevr):
    _, den, cond = clevr
    x = torch.randn(1, 3, 32, 32)
    with iv.record(den, "down_blocks.0") as rec, torch.no_grad():
        den.predict(x, 500, cond)
    edit = iv.Patch("mid_block", iv.FromStore(rec.store, site="down_blocks.0"))
    with pytest.raises(ValueError, match=r"'mid_block'.*\(1, 16, 16, 16\).*\(1, 32, 8, 8\)"):
        with iv.apply(den, edit), torch.no_grad():
            den.predict(x, 500, cond)


def test_store_errors_name_what_is_missing_and_refuse_ambiguity(clevr):
    _, den, cond = clevr
    x = torch.randn(1, 3, 32, 32)
    with iv.record(den, "mid_block") as rec:
        sample(den, cond, shape=(1, 3, 32, 32), num_steps=2, seed=0)
    with pytest.raises(KeyError, match=r"step 2 on branch 'cond'.*steps \[0, 1\]"):
        with iv.apply(den, iv.Patch("mid_block", iv.FromStore(rec.store))):
            sample(den, cond, shape=(1, 3, 32, 32), num_steps=3, seed=0)
    with pytest.raises(KeyError, match=r"branch 'uncond'.*branches \['cond'\]"):
        with iv.apply(den, iv.Patch("mid_block", iv.FromStore(rec.store))):
            sample(den, cond, shape=(1, 3, 32, 32), num_steps=2, seed=0, guidance_scale=2.0)
    with pytest.raises(KeyError, match="holds nothing for site.*up_blocks.0"):
        iv.apply(den, iv.Patch("up_blocks.0", iv.FromStore(rec.store))).__enter__()
    with iv.record(den, "mid_block") as twice, torch.no_grad():
        den.predict(x, 500, cond)
        den.predict(x, 400, cond)  # two calls, both step -1
    with pytest.raises(ValueError, match="2 calls.*ambiguous"):
        with iv.apply(den, iv.Patch("mid_block", iv.FromStore(twice.store))), torch.no_grad():
            den.predict(x, 500, cond)
    from interp import count_hooks

    assert count_hooks(den.unet) == 0


def test_unknown_site_lists_close_matches(clevr):
    _, den, _ = clevr
    with pytest.raises(SiteError, match="mid_block"):
        iv.apply(den, iv.Patch("mid_blok", iv.Zero())).__enter__()
    from interp import count_hooks

    assert count_hooks(den.unet) == 0


def test_patching_sweep_is_tidy_and_patching_the_output_at_every_step_restores_everything(clevr):
    pipe, den, cond = clevr
    corrupt = pipe.conditioning([[0.5, 0.5]])
    frame = iv.patching_sweep(den, cond, corrupt, ["mid_block", "output"], [0, 1], shape=(1, 3, 32, 32), num_steps=2)
    assert list(frame.columns) == ["site", "step", "metric", "value", "seed"]
    assert len(frame) == 4 and set(frame.metric) == {"restored_fraction"}
    # the last step's output patched in fixes the last prediction: partial restoration, strictly between 0 and 1
    last = frame[(frame.site == "output") & (frame.step == 1)].value.item()
    assert 0 < last < 1
    both = iv.patching_sweep(den, cond, corrupt, ["output"], [0], shape=(1, 3, 32, 32), num_steps=1)
    assert both.value.item() == pytest.approx(1.0, abs=1e-6)
