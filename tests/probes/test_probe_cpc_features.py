"""CPC residual and feature-space probes on models with known answers."""

from __future__ import annotations

import pytest
import torch

from probes import composition_masks, concept_cosines, cpc_residual, feature_dependence, linear_probe_map
from interp.models.analytic import toy_conditioning


def test_cpc_residual_is_zero_for_the_exactly_local_model(local_den, global_den, toy_cond):
    res = cpc_residual(local_den, toy_cond, [0.1, 0.9], 2, radius=0.21, dtype=torch.float64)
    df = res.frame()
    assert (df.query("metric == 'cpc_residual'").value < 1e-10).all()
    assert len(df.query("metric == 'cpc_residual' and stat == 'mean'")) == 2
    g = cpc_residual(global_den, toy_cond, 0.5, 1, radius=0.21, dtype=torch.float64)
    assert (g.frame().query("metric == 'cpc_residual'").value > 0.1).all()
    assert res["residual"].shape == (2, 12, 12)


def test_composition_masks_are_disjoint():
    m = composition_masks(torch.tensor([[0.3, 0.5], [0.5, 0.5]]), (16, 16), 0.3)
    assert float(m.sum(0).max()) == 1.0 and float(m[0].sum()) > 0 and float(m[1].sum()) > 0
    with pytest.raises(ValueError, match="radius"):
        composition_masks(torch.tensor([[0.3, 0.5]]), (16, 16), 0.0)


def test_cpc_needs_locations(local_den, toy_cond):
    from dataclasses import replace

    with pytest.raises(ValueError, match="locations"):
        cpc_residual(local_den, replace(toy_cond, locations=None), 0.5, 1)


def test_feature_dependence_is_local_at_a_local_site(local_den, global_den, toy_cond):
    r = local_den.unet.cond_radius
    res = feature_dependence(local_den, "inject", toy_cond, 0.5, 1, directions="all", radius=r + 1e-9, dtype=torch.float64)
    df = res.frame()
    assert (df.query("metric == 'in_region'").value >= 1 - 1e-6).all()
    assert (df.query("metric == 'feature_cpc_residual'").value < 1e-10).all()
    assert res["jvp_channels"].shape == (1, 2, 3, 12, 12)
    assert (df.query("metric == 'support_95'").value < 0.5).all()  # sparse over (channel, position)
    g = feature_dependence(global_den, "inject", toy_cond, 0.5, 1, directions=2, radius=r, dtype=torch.float64)
    assert (g.frame().query("metric == 'in_region'").value < 0.5).all()
    with pytest.raises(ValueError, match="matches 2 modules"):
        feature_dependence(local_den, "convs.*", toy_cond, 0.5, 1)


def test_feature_dependence_on_clevr_attention_site(clevr):
    pipe, den, cond = clevr
    site = "mid_block.attentions.0.transformer_blocks.0.attn2"
    res = feature_dependence(den, site, cond, 0.5, 1, directions=2)
    assert res["jvp"].shape == (1, 2, 8, 8) and res["ablation_channels"].shape[2] == 32
    assert res.metadata["site"] == site and set(res.frame().metric) >= {"hoyer", "feature_cpc_residual", "in_region"}


def test_concept_cosines_orthogonal_for_disjoint_concepts(linear_den):
    def concept(x, y, seed):
        return toy_conditioning([[x, y]], seed=seed, dtype=torch.float64)

    res = concept_cosines(linear_den, "inject", {"left": concept(0.2, 0.2, 1), "right": concept(0.8, 0.8, 2),
                                                 "left2": concept(0.25, 0.2, 3)}, 0.5, 2)
    cos = res["cosine"]
    assert abs(float(cos[0, 1])) < 1e-6 and abs(float(cos[1, 2])) < 1e-6  # disjoint supports
    assert abs(float(cos[0, 2])) > 0.05  # overlapping concepts are not orthogonal
    torch.testing.assert_close(torch.diagonal(cos), torch.ones(3))


def test_linear_probe_map_finds_where_the_attribute_is_encoded(linear_den):
    conds, labels = [], []
    for n in range(12):
        side = n % 2
        jitter = 0.01 * (n // 2 - 3)  # same concept features, slightly different positions
        conds.append(toy_conditioning([[(0.25 if side == 0 else 0.75) + jitter, 0.5]], seed=10, dtype=torch.float64))
        labels.append(side)
    res = linear_probe_map(linear_den, "inject", conds, labels, 0.5, 1)
    acc = res["accuracy"]
    assert acc.shape == (8, 8)
    assert float(acc[4, 2]) >= 0.9  # inside the left bump: the attribute is read off exactly
    assert float(acc[0, 0]) <= 0.6  # a corner no conditioner reaches: chance
    assert 0 < float(res.frame().query("metric == 'nonzero_fraction'").value.item()) <= 1


def test_concept_cosines_symmetric_unit_diagonal_and_seeded(clevr):
    pipe, den, _ = clevr
    site = "mid_block.attentions.0.transformer_blocks.0.attn2"
    concepts = {f"c{i}": pipe.conditioning([[0.2 + 0.15 * i, 0.3 + 0.1 * i]]) for i in range(4)}
    res = concept_cosines(den, site, concepts, 0.5, [3, 4])
    cos = res["cosine"]
    assert torch.equal(cos, cos.T)
    assert torch.equal(torch.diagonal(cos), torch.ones(4))
    assert bool((cos.abs() <= 1).all())
    again = concept_cosines(den, site, concepts, 0.5, [3, 4])["cosine"]
    assert torch.equal(cos, again)  # the seeds given fix the numbers
    other = concept_cosines(den, site, concepts, 0.5, [5, 6])["cosine"]
    assert not torch.equal(cos, other)  # and they are really used


def test_concept_cosines_refuses_a_zero_difference_vector(clevr):
    pipe, den, _ = clevr
    site = "mid_block.attentions.0.transformer_blocks.0.attn2"
    one = pipe.conditioning([[0.3, 0.3]])
    concepts = {"real": one, "nothing": one.null()}
    with pytest.raises(ValueError, match=r"\['nothing'\] have a zero difference vector"):
        concept_cosines(den, site, concepts, 0.5, 2)
