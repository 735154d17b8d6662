"""Distance-masked cross-attention: identity beyond the diagonal, the null condition at r = 0, and in between
exactly the queries far from a conditioner lose it."""

from __future__ import annotations

import pytest
import torch

import interventions as iv
from interp import count_hooks, sample

UP = "up_blocks.*attn2"
LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"  # 16x16 query grid


def test_a_radius_beyond_the_diagonal_is_bit_identical_to_no_edit(clevr):
    _, den, cond = clevr
    run = dict(shape=(2, 3, 32, 32), num_steps=2, seed=0, guidance_scale=2.0)
    plain = sample(den, cond, **run)
    with iv.apply(den, iv.MaskCrossAttention("*attn2", radius=1.5)) as applied:
        edited = sample(den, cond, **run)
    assert torch.equal(edited, plain)
    assert len(applied.frame()) > 0  # it was selected (and hid nothing)
    with iv.apply(den, iv.MaskCrossAttention("*attn2", radius=0.3)):
        assert not torch.equal(sample(den, cond, **run), plain)


def _null_tokens_at(den, paths, null_tokens):
    """Pre-hooks feeding the null condition's tokens to the given attn2 modules only."""
    modules = dict(den.unet.named_modules())
    handles = []
    for p in paths:
        def pre(module, args, kwargs):
            ehs = kwargs["encoder_hidden_states"]
            kwargs = {**kwargs, "encoder_hidden_states": null_tokens.to(ehs).expand(ehs.shape[0], -1, -1),
                      "attention_mask": None}
            return args, kwargs

        handles.append(modules[p].register_forward_pre_hook(pre, with_kwargs=True))
    return handles


def test_radius_zero_equals_the_null_condition_at_those_layers(clevr):
    _, den, cond = clevr
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    paths = [p for p, _ in den.unet.named_modules() if p.startswith("up_blocks") and p.endswith("attn2")]
    with iv.apply(den, iv.MaskCrossAttention(UP, radius=0.0)), torch.no_grad():
        masked = den.predict(x, 500, cond)
    handles = _null_tokens_at(den, paths, cond.null().tokens[None])
    try:
        with torch.no_grad():
            null_there = den.predict(x, 500, cond)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        plain = den.predict(x, 500, cond)
    torch.testing.assert_close(masked, null_there, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(masked, plain, atol=1e-4)


def test_a_finite_radius_hides_a_conditioner_exactly_from_the_far_queries(clevr):
    pipe, den, _ = clevr
    cond = pipe.conditioning([[0.1, 0.1]])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    radius = 0.3

    def attn2_out(edit):
        with iv.record(den, LAYER) as rec:
            if edit is None:
                with torch.no_grad():
                    den.predict(x, 500, cond)
            else:
                with iv.apply(den, edit), torch.no_grad():
                    den.predict(x, 500, cond)
        return rec.store.get(LAYER, -1)[0]  # (N, C)

    # the processor runs inside the module: record's forward hook sees the masked output
    plain, none, finite = attn2_out(None), attn2_out(iv.MaskCrossAttention(LAYER, radius=0.0)), \
        attn2_out(iv.MaskCrossAttention(LAYER, radius=radius))
    from interventions.masking import cell_centres

    centres = cell_centres((16, 16))
    near = (centres - torch.tensor([0.1, 0.1], dtype=torch.float64)).norm(dim=1) <= radius
    assert 0 < int(near.sum()) < near.numel()
    torch.testing.assert_close(finite[~near], none[~near], rtol=0, atol=1e-6)  # far: only context tokens
    torch.testing.assert_close(finite[near], plain[near], rtol=0, atol=1e-6)  # near: everything, as before
    assert not torch.allclose(plain[~near], none[~near], atol=1e-4)  # the conditioner did matter there


def test_refusals(clevr):
    pipe, den, cond = clevr
    with pytest.raises(ValueError, match="not cross-attention.*mid_block.*attn2"):
        iv.apply(den, iv.MaskCrossAttention("mid_block", radius=0.1)).__enter__()
    with pytest.raises(ValueError, match="not cross-attention"):
        iv.apply(den, iv.MaskCrossAttention("*attn1", radius=0.1)).__enter__()
    with pytest.raises(ValueError, match="'output'"):
        iv.apply(den, iv.MaskCrossAttention("output", radius=0.1)).__enter__()
    unlocated = type(cond)(tokens=cond.tokens, owner=cond.owner, labels=cond.labels)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="no locations"):
        with iv.apply(den, iv.MaskCrossAttention(radius=0.1)), torch.no_grad():
            den.predict(x, 500, unlocated)
    from interp import ConditioningBatch

    bare = ConditioningBatch.stack([cond])
    bare = ConditioningBatch(tokens=bare.tokens, mask=bare.mask, added=bare.added)  # built by hand: rows unknown
    with pytest.raises(ValueError, match="no announced Conditioning"):
        with iv.apply(den, iv.MaskCrossAttention(radius=0.1)), torch.no_grad():
            den.predict(x, 500, bare)
    assert count_hooks(den.unet) == 0
    assert all(type(p).__name__ != "DistanceMaskedProcessor" for p in den.unet.attn_processors.values())


def test_forward_mode_probes_run_under_the_mask_and_see_its_locality():
    """The JVP map is measured with the mask active: conditioner tokens reach only pixels within the radius at the
    masked layers, so the probe must see the mask's rows (each row's Conditioning travels with its traced tokens)."""
    import probes
    from interp.models import clevr_pipeline

    pipe = clevr_pipeline("tiny", seed=0)
    den, cond = pipe.denoiser(), pipe.conditioning([[0.2, 0.25], [0.75, 0.7]])
    plain = probes.conditional_locality(den, cond, t=0.5, seeds=1, maps=("jvp",), directions=2)
    with iv.apply(den, iv.MaskCrossAttention("*attn2", radius=1e-9)):  # only the null token visible: no dependence
        masked = probes.conditional_locality(den, cond, t=0.5, seeds=1, maps=("jvp",), directions=2)
    assert float(plain["jvp"].abs().max()) > 0
    assert float(masked["jvp"].abs().max()) == 0.0
