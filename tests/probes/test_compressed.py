"""The compressed Jacobian's certificate is sound for any model, not just for models with connected supports.

Adversarial models: a radius-1 convolution plus couplings the colourings cannot see (a far disconnected tap, an
offset that is a multiple of both old colouring spacings 3 and 5, one global pixel). Dense ground truth comes
from ``torch.autograd.functional.jacobian``, independent of the code under test.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from interp import Denoiser
from interp.evaluate import evaluate
from interp.inputs import forward_samples, resolve_timestep
from interp.models.analytic import toy_conditioning, toy_denoiser
from probes.compressed import compressed_jacobian

T = 0.5


class _Tapped(nn.Module):
    """``tanh(conv3x3(x)) + extra(x)``: exactly radius 1 when ``extra`` is None; UNet2DConditionModel call signature."""

    def __init__(self, extra: Callable[[Tensor], Tensor] | None = None, channels: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1).double()
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.4)
        self.extra = extra
        self.config = {"in_channels": channels, "out_channels": channels}

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, return_dict: bool = False, **kw):
        out = torch.tanh(self.conv(sample))
        if self.extra is not None:
            out = out + self.extra(sample)
        return (out,)


def _far_tap(x: Tensor) -> Tensor:
    """Output pixel (2, 2) also reads input pixel (13, 11) of every channel, weight 0.3."""
    at = torch.zeros(x.shape[-2:], dtype=x.dtype)
    at[2, 2] = 1  # a mask, not in-place writes into the output: the pullback is vmapped
    return 0.3 * x[:, :, 13, 11].sum(1)[:, None, None, None] * at


def _offset15(x: Tensor) -> Tensor:
    """Every output also reads the input exactly 15 px away along the (circular, W = 30) width."""
    return 0.3 * torch.roll(x, 15, dims=-1)


def _one_global_pixel(x: Tensor) -> Tensor:
    """Local except at one output pixel, (5, 7), which reads the mean of the whole image."""
    at = torch.zeros(x.shape[-2:], dtype=x.dtype)
    at[5, 7] = 1
    return x.mean(dim=(1, 2, 3))[:, None, None, None] * at


def _setup(extra, shape=(3, 16, 16), seeds=(0,)):
    den = Denoiser(_Tapped(extra, shape[0]), name="tapped")
    cond = toy_conditioning([[0.3, 0.3]], dtype=torch.float64)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds])
    return den, cond, x


def _dense(den, cond, x, t=T) -> Tensor:
    """``(S, H·W, C_out, C_in, H, W)`` by plain autograd, one sample at a time."""
    ts = resolve_timestep(den, t=t)
    out = []
    for s in range(x.shape[0]):
        j = torch.autograd.functional.jacobian(lambda v: evaluate(den, v, ts, cond), x[s : s + 1], vectorize=True)
        C, H, W = x.shape[1:]
        out.append(j.reshape(C, H * W, C, H, W).transpose(0, 1))
    return torch.stack(out)


def _old_certificate(den, cond, x, radius):
    """The replaced two-colouring certificate (for the regression assertions), on sample 0."""
    from probes.compressed import _recover, colouring_cotangents
    from probes.jacobian import RowEngine

    ts = resolve_timestep(den, t=T)
    eng = RowEngine(lambda v: evaluate(den, v, ts, cond), x[:1])
    C, H, W = x.shape[1:]
    sA, sB = 2 * radius + 1, 2 * radius + 3
    jA = _recover(eng(colouring_cotangents(sA, (C, H, W), dtype=x.dtype, device="cpu")), sA, H, W, C)
    jB = _recover(eng(colouring_cotangents(sB, (C, H, W), dtype=x.dtype, device="cpu")), sB, H, W, C)
    r, c = torch.arange(H), torch.arange(W)
    dist = torch.maximum((r[:, None, None, None] - r[None, None, :, None]).abs(),
                         (c[None, :, None, None] - c[None, None, None, :]).abs()).reshape(H * W, H, W)
    inner = (dist <= radius)[:, None, None]
    tol = 1e-5 * jA.abs().max()
    ring_bad = (jB * ~inner).abs().flatten(1).amax(1) > tol
    agree_bad = ((jB - jA) * inner).abs().flatten(1).amax(1) > tol
    return ~(ring_bad | agree_bad), jA


def _assert_sound(den, cond, x, dense, radius_px=1):
    raw = compressed_jacobian(den, cond, x_t=x, t=T, radius_px=radius_px, fallback=False)
    cert = raw.certified
    torch.testing.assert_close(raw.jacobian[cert], dense[cert], rtol=0, atol=1e-12)  # certified rows are exact
    wrong = (raw.jacobian - dense).abs().flatten(2).amax(2) > 1e-9  # (S, HW) pixels the colouring got wrong
    assert not bool((wrong & cert).any())
    full = compressed_jacobian(den, cond, x_t=x, t=T, radius_px=radius_px)
    torch.testing.assert_close(full.jacobian, dense, rtol=0, atol=1e-12)  # fallback makes everything exact
    assert torch.equal(full.certified, cert)  # same seed, same checks
    return raw, full, wrong


def test_far_disconnected_tap_is_caught():
    den, cond, x = _setup(_far_tap)
    dense = _dense(den, cond, x)
    old_cert, old_j = _old_certificate(den, cond, x, 1)
    old_err = (old_j - dense[0]).abs().flatten(1).amax(1)
    assert bool((old_cert & (old_err > 0.1)).any())  # the old certificate passed a row that was off by >= 0.1
    raw, full, wrong = _assert_sound(den, cond, x, dense)
    assert bool(wrong.any()) and int((~raw.certified).sum()) <= 8  # localised to a few pixels, not all
    assert full.passes < 0.15 * full.dense_passes


def test_offset_multiple_of_both_spacings_is_caught():
    den, cond, x = _setup(_offset15, shape=(3, 6, 30))
    dense = _dense(den, cond, x)
    old_cert, old_j = _old_certificate(den, cond, x, 1)
    assert bool(old_cert.all())  # the old certificate passed every row...
    assert float((old_j - dense[0]).abs().max()) > 0.1  # ...and they were wrong
    raw, full, wrong = _assert_sound(den, cond, x, dense)
    assert bool(wrong.all()) and not bool(raw.certified.any())
    # every row wrong: colouring 27 + checks (1 + 8, then re-verify 1) + dense 540
    assert full.check_passes == 10 and full.passes == 27 + 10 + full.dense_passes


def test_local_except_one_pixel():
    den, cond, x = _setup(_one_global_pixel)
    dense = _dense(den, cond, x)
    raw, full, wrong = _assert_sound(den, cond, x, dense)
    assert bool(wrong.any()) and bool(raw.certified.any())


def test_local_model_certified_everywhere_cheaply():
    den = toy_denoiser("local", size=16, dtype=torch.float64)  # receptive-field radius 2
    cond = toy_conditioning([[0.25, 0.25], [0.75, 0.7]], dtype=torch.float64)
    x, _ = forward_samples(den, T, [0, 1], dtype=torch.float64)
    dense = _dense(den, cond, x)
    raw, full, wrong = _assert_sound(den, cond, x, dense, radius_px=2)
    assert bool(raw.certified.all()) and not bool(wrong.any())
    assert full.check_passes == 2  # one check per sample
    assert full.passes == 2 * (25 * 3 + 1) and full.dense_passes == 2 * 16 * 16 * 3
    # a radius below the true one: not certified everywhere, and the fallback repairs it
    low = compressed_jacobian(den, cond, x_t=x[:1], t=T, radius_px=1)
    assert not bool(low.certified.all())
    torch.testing.assert_close(low.jacobian, dense[:1], rtol=0, atol=1e-12)


def test_global_toy_model_falls_back(global_den, toy_cond):
    x, _ = forward_samples(global_den, T, [0], dtype=torch.float64)
    dense = _dense(global_den, toy_cond, x)
    raw, full, _ = _assert_sound(global_den, toy_cond, x, dense, radius_px=2)
    assert not bool(raw.certified.any())


def test_float32_tolerance_certifies_local_model():
    den = toy_denoiser("local", size=16)
    cond = toy_conditioning([[0.25, 0.25]])
    x, ts = forward_samples(den, T, [0])
    cj = compressed_jacobian(den, cond, x_t=x, timestep=ts, radius_px=2)
    assert bool(cj.certified.all())  # float32 rounding stays inside the default tolerance
    assert cj.jacobian.dtype == torch.float32


def test_seed_is_deterministic_and_checks_count():
    den, cond, x = _setup(_far_tap)
    a = compressed_jacobian(den, cond, x_t=x, t=T, radius_px=1, seed=3, checks=2)
    b = compressed_jacobian(den, cond, x_t=x, t=T, radius_px=1, seed=3, checks=2)
    assert torch.equal(a.jacobian, b.jacobian) and torch.equal(a.certified, b.certified)
    one = compressed_jacobian(den, cond, x_t=x, t=T, radius_px=1, seed=3, checks=1)
    assert a.check_passes == 2 * one.check_passes


def test_arguments():
    den, cond, x = _setup(None)
    with pytest.warns(DeprecationWarning, match="radius_px"):
        old = compressed_jacobian(den, cond, x_t=x, t=T, radius=1)
    assert old.radius_px == 1 and bool(old.certified.all())
    with pytest.raises(TypeError, match="radius_px"):
        compressed_jacobian(den, cond, x_t=x, t=T, radius_px=1, radius=1)
    with pytest.raises(TypeError, match="radius_px"):
        compressed_jacobian(den, cond, x_t=x, t=T)
    with pytest.raises(TypeError, match="radius_px"):
        compressed_jacobian(den, cond, x_t=x, t=T, radius_px=1.5)
    with pytest.raises(ValueError, match="radius_px"):
        compressed_jacobian(den, cond, x_t=x, t=T, radius_px=-1)
    with pytest.raises(ValueError, match="exactly one of t="):
        compressed_jacobian(den, cond, x_t=x, radius_px=1)
    with pytest.raises(ValueError, match="exactly one of t="):
        compressed_jacobian(den, cond, x_t=x, t=T, timestep=500, radius_px=1)
    with pytest.raises(TypeError, match="cond must be a Conditioning"):
        compressed_jacobian(den, x, x_t=x, t=T, radius_px=1)
    with pytest.raises(ValueError, match="checks"):
        compressed_jacobian(den, cond, x_t=x, t=T, radius_px=1, checks=0)
    with pytest.raises(ValueError, match="x_t"):
        compressed_jacobian(den, cond, x_t=x[0], t=T, radius_px=1)


def test_bfloat16_model_accumulates_in_float32():
    den = toy_denoiser("local", size=12, dtype=torch.bfloat16)
    cond = toy_conditioning([[0.25, 0.25]])
    x, _ = forward_samples(den, T, [0])
    cj = compressed_jacobian(den, cond, x_t=x, t=T, radius_px=2)
    assert cj.jacobian.dtype == torch.float32 and bool(cj.certified.all())
    ref = compressed_jacobian(toy_denoiser("local", size=12), cond, x_t=x, t=T, radius_px=2).jacobian
    torch.testing.assert_close(cj.jacobian, ref, rtol=0, atol=5e-2 * float(ref.abs().max()))
