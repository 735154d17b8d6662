"""Composition: exact on the additive analytic model, the identity where it must be, other rows untouched."""

from __future__ import annotations

import pytest
import torch

import interventions as iv
from interp import count_hooks
from interp.masks import composition_masks


def test_score_composition_of_the_exactly_local_model_is_its_own_output(local_den, toy_cond):
    """ToyUNet("local") is ``out(h(x)) + Σ_l bump_l ⊙ g_l`` with bumps of radius 0.2 around each token's location
    (the context token's bump is zero): D(c) − D(∅) = Σ_j inj_j and D(c_j) − D(∅) = inj_j, with inj_j supported
    on the disc of radius 0.2 around c_j. The conditioners are 0.67 apart, so discs of radius 0.25 hold each
    support and are nearest to their own conditioner: D(∅) + Σ_j m_j (D(c_j) − D(∅)) = D(c)."""
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        plain = local_den.predict(x, 500, toy_cond)
        with iv.apply(local_den, iv.ComposeScores(radius=0.25)) as applied:
            composed = local_den.predict(x, 500, toy_cond)
        # feature-space composition at the site where the conditioners enter: the same identity
        with iv.apply(local_den, iv.Compose("inject", radius=0.25)):
            at_inject = local_den.predict(x, 500, toy_cond)
        # too small a disc cuts the supports: no longer the model's output
        with iv.apply(local_den, iv.ComposeScores(radius=0.1)):
            cut = local_den.predict(x, 500, toy_cond)
    torch.testing.assert_close(composed, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(at_inject, plain, rtol=0, atol=1e-12)
    assert (cut - plain).abs().max() > 1e-3
    assert applied.frame().rows.tolist() == [2]


def test_one_conditioner_and_a_disc_over_the_image_is_the_identity_at_inner_sites(clevr):
    """With k = 1 and radius > diagonal, m_1 = 1 everywhere and h := h(c_1) = h(c): the expanded batch (extra
    rows, padded tokens, an all-True mask) may change float rounding only (allclose, not equal)."""
    pipe, den, _ = clevr
    cond = pipe.conditioning([[0.3, 0.6]])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sites = ["mid_block", "up_blocks.0.attentions.0.transformer_blocks.0.attn2", "down_blocks.1.resnets.0"]
    with torch.no_grad():
        plain = den.predict(x, 500, cond)
        with iv.apply(den, iv.Compose(sites, radius=1.5)) as applied:
            composed = den.predict(x, 500, cond)
    torch.testing.assert_close(composed, plain, rtol=1e-5, atol=1e-5)
    assert set(applied.frame().site) == set(sites)


def test_rows_of_other_branches_pass_through(clevr):
    """Batched CFG: the uncond rows are not expanded; they match the plain forward up to batching rounding."""
    _, den, cond = clevr
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = den.branches(x, 500, cond)
        with iv.apply(den, iv.Compose("mid_block", radius=0.2)) as applied:
            composed = den.branches(x, 500, cond)
    torch.testing.assert_close(composed["uncond"], plain["uncond"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(composed["cond"], plain["cond"], atol=1e-4)
    assert set(applied.frame().branch) == {"cond"}
    # a step selection that matches nothing: no expansion at all, bit-identical
    with torch.no_grad(), iv.apply(den, iv.Compose("mid_block", radius=0.2, steps=[3])):
        assert torch.equal(den.branches(x, 500, cond)["cond"], plain["cond"])
    assert count_hooks(den.unet) == 0


def test_soft_masks(clevr):
    locs = torch.tensor([[0.25, 0.25], [0.75, 0.7]])
    hard = iv.soft_composition_masks(locs, (16, 16), 0.2, 0.0)
    assert torch.equal(hard, composition_masks(locs, (16, 16), 0.2))
    soft = iv.soft_composition_masks(locs, (16, 16), 0.2, 0.1)
    assert soft.min() >= 0 and soft.max() <= 1
    assert torch.equal(soft[hard > 0], hard[hard > 0])  # 1 inside the disc
    assert (soft.sum(0) <= 1).all()  # still disjoint
    wide = iv.soft_composition_masks(locs, (16, 16), 0.3, 0.0)
    assert (soft[wide == 0] == 0).all() and ((soft > 0) & (soft < 1)).any()


def test_compose_needs_located_conditionings(clevr):
    _, den, cond = clevr
    unlocated = type(cond)(tokens=cond.tokens, owner=cond.owner, labels=cond.labels)
    with pytest.raises(ValueError, match="no locations"), torch.no_grad():
        with iv.apply(den, iv.ComposeScores(radius=0.2)):
            den.predict(torch.randn(1, 3, 32, 32), 500, unlocated)
    assert count_hooks(den.unet) == 0


def test_effect_frame(clevr):
    _, den, cond = clevr
    frame = iv.effect(den, iv.MaskCrossAttention(radius=0.1), cond, t=[0.3, 0.7], seeds=2)
    assert list(frame.columns) == ["t", "timestep", "seed", "region", "value", "edit", "quantity", "branch"]
    assert len(frame) == 2 * 2 * 3 and (frame.value > 0).all()
    none = iv.effect(den, iv.MaskCrossAttention(radius=1.5), cond, t=0.5, seeds=1)
    assert (none.value == 0).all()
    with pytest.raises(ValueError, match="fired on none"):
        iv.effect(den, iv.MaskCrossAttention(radius=0.1, steps=[0]), cond, t=0.5, seeds=1)


def test_single_conditioner_rows_are_the_rows_own_tokens_so_derivatives_see_them():
    """Under Compose the composed output depends on c_j through its single-conditioner row: a JVP along c_j is
    nonzero and equals the finite difference of the composed function (not 0, as with constant auxiliary tokens)."""
    from interp.models.analytic import toy_conditioning, toy_denoiser

    den = toy_denoiser("global", size=12, dtype=torch.float64)
    cond = toy_conditioning([[0.25, 0.25], [0.75, 0.7]], dtype=torch.float64)
    assert torch.equal(cond.only(1).tokens, cond.tokens[(cond.owner == -1) | (cond.owner == 1)])
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = torch.zeros_like(cond.tokens)
    v[cond.token_indices(1), 2:] = 1.0  # move conditioner 1's features

    def f(tokens):
        from interp import ConditioningBatch

        cb = ConditioningBatch.stack([cond]).with_tokens(tokens[None])
        return den.predict(x, 500, cb)

    with iv.apply(den, iv.ComposeScores(0.2)):
        _, jv = torch.func.jvp(f, (cond.tokens,), (v,))
        eps = 1e-6
        fd = (f(cond.tokens + eps * v) - f(cond.tokens - eps * v)) / (2 * eps)
    assert float(jv.abs().max()) > 1e-6
    torch.testing.assert_close(jv, fd, rtol=1e-5, atol=1e-8)
