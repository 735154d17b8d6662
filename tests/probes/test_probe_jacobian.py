"""Pixel Jacobians: equal to autograd rows and finite differences; exact locality on the local model."""

from __future__ import annotations

import pytest
import torch

from probes import pixel_jacobian, pixel_locality
from interp.inputs import forward_samples, pixel_list
from interp.evaluate import evaluate
from probes.summaries import mass_outside


def _autograd_rows(den, x, ts, cond, pixels):
    rows = []
    for r, c in pixels:
        for ch in range(x.shape[1]):
            xx = x.clone().requires_grad_(True)
            out = evaluate(den, xx, ts, cond)
            rows.append(torch.autograd.grad(out[0, ch, r, c], xx)[0][0])
    return torch.stack(rows)


def test_rows_equal_autograd_and_finite_differences(global_den, toy_cond):
    x, ts = forward_samples(global_den, 0.5, [3], dtype=torch.float64)
    px = [(0, 0), (5, 7), (11, 3)]
    jac = pixel_jacobian(global_den, toy_cond, x_t=x, timestep=ts, pixels=px, chunk_size=4)
    assert jac.shape == (1, 3, 3, 3, 12, 12) and jac.dtype == torch.float64
    ref = _autograd_rows(global_den, x, ts, toy_cond, px)
    torch.testing.assert_close(jac[0].reshape(-1, 3, 12, 12), ref, rtol=1e-10, atol=1e-12)
    # central finite differences along a random direction, for every probed output element
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (evaluate(global_den, x + h * v, ts, toy_cond) - evaluate(global_den, x - h * v, ts, toy_cond)) / (2 * h)
    jv = (jac[0] * v[0]).sum((-3, -2, -1))  # (P, C_out)
    for p, (r, c) in enumerate(px):
        torch.testing.assert_close(jv[p], fd[0, :, r, c], rtol=1e-6, atol=1e-8)


def test_chunk_size_does_not_change_rows(local_den, toy_cond):
    x, ts = forward_samples(local_den, 0.3, [0], dtype=torch.float64)
    a = pixel_jacobian(local_den, toy_cond, x_t=x, timestep=ts, pixels=3, chunk_size=1)
    b = pixel_jacobian(local_den, toy_cond, x_t=x, timestep=ts, pixels=3, memory_budget="64MiB")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_clevr_rows_equal_autograd(clevr):
    pipe, den, cond = clevr
    x, ts = forward_samples(den, 0.7, [1])
    px = [(2, 30)]
    jac = pixel_jacobian(den, cond, x_t=x, timestep=ts, pixels=px)
    ref = _autograd_rows(den, x, ts, cond, px)
    torch.testing.assert_close(jac[0].reshape(-1, 3, 32, 32), ref, rtol=1e-4, atol=1e-5)


def _box(px, hw, radius):
    H, W = hw
    rr = torch.arange(H).view(1, H, 1)
    cc = torch.arange(W).view(1, 1, W)
    return ((rr - px[:, 0].view(-1, 1, 1)).abs() <= radius) & ((cc - px[:, 1].view(-1, 1, 1)).abs() <= radius)


def test_local_model_has_no_mass_outside_receptive_field(local_den, global_den, toy_cond):
    res = pixel_locality(local_den, toy_cond, [0.1, 0.9], 2, pixels="all", dtype=torch.float64)
    G = res["G"]  # (T, P, H, W)
    px = res["pixels"]
    support = _box(px, (12, 12), 2)  # two 3x3 convolutions
    outside = mass_outside(G, support)
    assert float(outside.max()) <= 1e-6
    assert float(mass_outside(G, _box(px, (12, 12), 1)).max()) > 1e-3  # the support really has radius 2
    df = res.frame()
    centre = df[(df.pixel_row == 6) & (df.pixel_col == 6) & (df.metric == "side_95")]
    assert (centre.value <= 5).all() and len(centre) == 2
    g = pixel_locality(global_den, toy_cond, 0.5, 1, pixels=[(6, 6)], dtype=torch.float64)
    assert float(mass_outside(g["G"][0], _box(g["pixels"], (12, 12), 2))) > 1e-3


def test_clevr_unet_is_not_exactly_local(clevr):
    pipe, den, cond = clevr
    res = pixel_locality(den, cond, 0.5, 1, pixels=[(16, 16)])
    frac = mass_outside(res["G"][0], _box(res["pixels"], (32, 32), 4))
    assert float(frac) > 1e-4  # GroupNorm and self-attention couple distant pixels
    assert set(res.frame().metric) >= {"side_50", "radius_95", "participation_ratio", "backward_passes"}


def test_compressed_method_in_pixel_locality(local_den, toy_cond):
    a = pixel_locality(local_den, toy_cond, 0.5, 1, pixels=4, dtype=torch.float64)
    b = pixel_locality(local_den, toy_cond, 0.5, 1, pixels=4, method="compressed", radius_px=2, dtype=torch.float64)
    torch.testing.assert_close(a["G"], b["G"])
    passes = b.frame().query("metric == 'backward_passes'").value.item()
    assert passes < 12 * 12 * 3
    with pytest.raises(ValueError, match="radius"):
        pixel_locality(local_den, toy_cond, 0.5, 1, method="compressed")


def test_half_precision_accumulates_in_float32(toy_cond):
    from interp.models.analytic import toy_denoiser

    den32 = toy_denoiser("local", size=12)
    den16 = toy_denoiser("local", size=12, dtype=torch.bfloat16)
    c32 = toy_cond.to(dtype=torch.float32)
    g32 = pixel_locality(den32, c32, 0.5, 1, pixels=[(6, 6)])["G"]
    r16 = pixel_locality(den16, c32, 0.5, 1, pixels=[(6, 6)])
    assert r16["G"].dtype == torch.float32
    torch.testing.assert_close(r16["G"], g32, rtol=5e-2, atol=5e-2 * float(g32.max()))


def test_pixel_spec_errors():
    with pytest.raises(ValueError, match="lie in"):
        pixel_list([(0, 40)], (32, 32))
    with pytest.raises(ValueError, match="pixels must be"):
        pixel_list("some", (32, 32))
    assert pixel_list(8, (32, 32)).shape == (16, 2)
    from probes import log_levels

    lv = log_levels(10)
    assert len(lv) == 10 and lv[0] == 0.02 and lv[-1] == 0.98 and lv == sorted(lv)


def test_mass_summaries_on_known_maps():
    from probes.summaries import effective_conditioners, mass_radius, mass_square_side, participation_ratio, region_fractions

    delta = torch.zeros(1, 9, 9)
    delta[0, 4, 4] = 2.0
    centre = torch.tensor([[4, 4]])
    assert int(mass_square_side(delta, centre, 0.95)) == 1 and float(mass_radius(delta, centre, 0.5)) == 0.0
    assert float(participation_ratio(delta)) == pytest.approx(1.0)
    flat = torch.ones(1, 9, 9)
    assert float(participation_ratio(flat)) == pytest.approx(81.0)
    assert int(mass_square_side(flat, centre, 0.5)) == 7  # 49/81 >= 0.5 > 25/81
    block = torch.zeros(1, 9, 9)
    block[0, 3:6, 3:6] = 1.0
    assert int(mass_square_side(block, centre, 0.95)) == 3
    fr = region_fractions(torch.stack([block[0], block[0]]), torch.tensor([[4.5 / 9, 4.5 / 9], [0.9, 0.9]]), 0.2)
    assert float(fr["in_region"][0]) == pytest.approx(1.0) and float(fr["in_region"][1]) == 0.0
    assert float(fr["leak_other"][1]) == pytest.approx(1.0)  # all of it nearer conditioner 0
    n_eff, mean = effective_conditioners(torch.stack([block[0], block[0]]))
    assert float(mean) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="NaN"):
        participation_ratio(torch.full((1, 3, 3), float("nan")))
