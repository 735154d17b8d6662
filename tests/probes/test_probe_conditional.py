"""Conditional maps: JVP equals reverse mode; exact locality on the local model; captum agrees on a linear model."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from interp import count_hooks
from probes import conditional_locality, conditioner_jvp, forward_mode_ready, integrated_gradients_map
from probes.conditional import direction_set, token_function
from interp.inputs import forward_samples
from interp.models.analytic import feature_baseline, toy_conditioning


def _token_jacobian(den, x, ts, cond):
    """Reverse-mode ∂output/∂tokens, (C, H, W, L, D)."""
    f = token_function(den, x, ts, cond, 1)
    return torch.autograd.functional.jacobian(lambda tok: f(tok[None])[0], cond.tokens)


def test_jvp_equals_reverse_mode(global_den, toy_cond):
    x, ts = forward_samples(global_den, 0.4, [2], dtype=torch.float64)
    J = _token_jacobian(global_den, x, ts, toy_cond)
    v, factor = direction_set(toy_cond, 1, "all")
    jv = conditioner_jvp(global_den, toy_cond, v, x_t=x, timestep=ts, chunk_size=5)  # (N, C, H, W)
    ref = torch.einsum("chwld,nld->nchw", J, v)
    torch.testing.assert_close(jv, ref, rtol=1e-10, atol=1e-12)
    # the exact JVP map is the Frobenius norm of the conditioner's Jacobian block
    res = conditional_locality(global_den, toy_cond, 0.4, [2], maps=("jvp",), dtype=torch.float64)
    idx = toy_cond.token_indices(1)
    fro = J[..., idx, :].pow(2).sum((0, 3, 4)).sqrt()
    torch.testing.assert_close(res["jvp"][0, 1].double(), fro, rtol=1e-5, atol=1e-7)


def test_jvp_matches_vjp_on_clevr_and_model_is_restored(clevr):
    pipe, den, cond = clevr
    procs = {n: type(p) for n, p in pipe.unet.attn_processors.items()}
    x, ts = forward_samples(den, 0.5, [0])
    v, _ = direction_set(cond, 0, 2, seed=0)
    with forward_mode_ready(den.unet):
        assert count_hooks(den.unet) > 0
        jv = conditioner_jvp(den, cond, v, x_t=x, timestep=ts)  # (2, C, H, W)
    assert count_hooks(den.unet) == 0
    assert {n: type(p) for n, p in pipe.unet.attn_processors.items()} == procs
    assert AttnProcessor2_0 in procs.values()
    # <u, J v> == <J^T u, v> by reverse mode
    u = torch.randn(jv.shape[1:], generator=torch.Generator().manual_seed(1))
    f = token_function(den, x, ts, cond, 1)
    tok = cond.tokens.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((f(tok[None])[0] * u).sum(), tok)
    for n in range(2):
        torch.testing.assert_close((jv[n] * u).sum(), (g * v[n]).sum(), rtol=1e-3, atol=1e-4)


def test_exactly_local_model_has_no_mass_outside_the_conditioner_disc(local_den, global_den, toy_cond):
    r = local_den.unet.cond_radius
    res = conditional_locality(local_den, toy_cond, [0.2, 0.8], 2, maps=("jvp", "ablation"), radius=r + 1e-9, dtype=torch.float64)
    df = res.frame()
    inside = df[df.metric == "in_region"]
    assert len(inside) == 2 * 2 * 2 and (inside.value >= 1 - 1e-6).all()
    assert (df[df.metric == "n_eff"].value <= 1 + 1e-9).all()
    assert res["jvp"].shape == (2, 2, 12, 12) and float(res["jvp"].sum()) > 0
    g = conditional_locality(global_den, toy_cond, 0.5, 1, maps=("jvp", "ablation"), directions=3, radius=r, dtype=torch.float64)
    gin = g.frame().query("metric == 'in_region'")
    assert (gin.value < 0.5).all()
    assert (g.frame().query("metric == 'leak_other'").value > 0.1).all()
    assert (g.frame().query("metric == 'n_eff'").value > 1.5).all()


def test_clevr_conditional_maps_are_non_local(clevr):
    pipe, den, cond = clevr
    res = conditional_locality(den, cond, 0.9, 1, maps=("jvp", "ablation"), directions=2)
    assert res["jvp"].shape == (1, 2, 32, 32) and res["ablation"].shape == (1, 2, 32, 32)
    df = res.frame()
    assert (df.query("metric == 'in_region'").value < 0.9).all()
    assert {"model", "site", "t", "metric", "value", "conditioner", "map_name", "config_hash"} <= set(df.columns)


def test_guided_branch_scales_the_conditional_derivative(toy_cond):
    from interp.models.analytic import toy_denoiser
    from interp import Denoiser

    base = toy_denoiser("local", size=12, dtype=torch.float64)
    guided = Denoiser(base.unet, guidance_scale=3.0)
    a = conditional_locality(base, toy_cond, 0.5, 1, maps=("jvp", "ablation"), directions=2, dtype=torch.float64)
    b = conditional_locality(guided, toy_cond, 0.5, 1, maps=("jvp", "ablation"), directions=2, branch="guided", dtype=torch.float64)
    torch.testing.assert_close(b["jvp"], 3 * a["jvp"])
    torch.testing.assert_close(b["ablation"], 3 * a["ablation"])


def test_captum_integrated_gradients_agrees_with_jvp_on_linear_model(linear_den):
    cond = toy_conditioning([[0.25, 0.25], [0.75, 0.7]], dtype=torch.float64)
    base = feature_baseline(cond)
    ig = integrated_gradients_map(linear_den, cond, 0.5, 1, baseline=base, n_steps=8, dtype=torch.float64)
    jv = conditional_locality(linear_den, cond, 0.5, 1, maps=("attribution",), baseline=base, dtype=torch.float64)
    A, B = ig["attribution"], jv["attribution"]
    assert A.shape == B.shape == (1, 2, 3, 8, 8)
    assert torch.equal(A.abs() > 1e-6, B.abs() > 1e-6) and int((B.abs() > 1e-6).sum()) > 0  # same support
    support = B.abs() > 1e-6
    assert torch.equal(torch.sign(A[support]), torch.sign(B[support]))  # same sign
    torch.testing.assert_close(A, B, rtol=1e-5, atol=1e-6)
    assert float(ig["delta"].max()) < 1e-6
    assert set(ig.frame().metric) >= {"in_region", "convergence_delta"}


def test_clear_errors(local_den, toy_cond):
    with pytest.raises(ValueError, match="no conditioner"):
        conditional_locality(local_den, toy_cond.null(), 0.5, 1)
    with pytest.raises(ValueError, match="exceed"):
        conditional_locality(local_den, toy_cond, 0.5, 1, max_conditioners=1)
    with pytest.raises(ValueError, match="maps must be"):
        conditional_locality(local_den, toy_cond, 0.5, 1, maps=("nope",))
    with pytest.raises(ValueError, match="NaN"):
        conditional_locality(local_den, toy_cond, 0.5, 1, x0=torch.full((3, 12, 12), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="channels"):
        conditional_locality(local_den, toy_cond, 0.5, 1, x0=torch.zeros(4, 12, 12, dtype=torch.float64), maps=("ablation",))
    with pytest.raises(ValueError, match="fractions"):
        conditional_locality(local_den, toy_cond, 1.5, 1)


def test_half_precision_jvp_accumulates_in_float32(toy_cond):
    from interp.models.analytic import toy_denoiser

    c32 = toy_cond.to(dtype=torch.float32)
    a = conditional_locality(toy_denoiser("local", size=12), c32, 0.5, 1, maps=("jvp",), directions=4)
    b = conditional_locality(toy_denoiser("local", size=12, dtype=torch.bfloat16), c32, 0.5, 1, maps=("jvp",), directions=4)
    assert b["jvp"].dtype == torch.float32
    torch.testing.assert_close(b["jvp"], a["jvp"], rtol=5e-2, atol=5e-2 * float(a["jvp"].max()))
    assert (b.frame().query("metric == 'in_region'").value >= 1 - 1e-6).all()  # locality is exact in bf16 too


def test_exp3_architecture_is_conditionally_local_by_construction():
    """The locality-enforcing CLEVR U-Net (interp.models.clevr_local), random weights, float64."""
    from interp import Denoiser
    from interp.models.clevr_local import ClevrLocalUNet, LocatedLocationEncoder, conditioner_radius
    from probes import cpc_residual

    torch.manual_seed(0)
    unet = ClevrLocalUNet(block_out_channels=(8, 16), cross_attention_dim=16, attention_head_dim=8).double()
    enc = LocatedLocationEncoder(dim=16).double()
    with torch.no_grad():
        cond = enc.conditioning([[0.15, 0.15], [0.85, 0.85]])
    den = Denoiser(unet, name="exp3-arch")
    r = conditioner_radius(unet)
    assert r < 0.5  # the disc leaves pixels out: the check below is not vacuous
    res = conditional_locality(den, cond, [0.5, 0.9], 1, maps=("jvp", "ablation"), directions=4, radius=r, dtype=torch.float64)
    df = res.frame()
    assert (df.query("metric == 'in_region'").value >= 1 - 1e-6).all()
    assert float(res["jvp"].sum()) > 0 and float(res["ablation"].sum()) > 0
    cpc = cpc_residual(den, cond, 0.9, 1, radius=r, dtype=torch.float64).frame()
    assert (cpc.query("metric == 'cpc_residual_regions'").value < 1e-10).all()  # composition exact inside the discs
