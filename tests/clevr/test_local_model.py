"""The Exp3 architecture is local by construction: measured, exactly.

In float64 with random weights: the gradient of an output pixel with respect to input pixels beyond the
receptive radius, and its change when a conditioner beyond the conditioner radius moves or disappears, are
zero (relative 1e-6 is the stated bar; we get exact zeros). The same probes on the standard GroupNorm +
self-attention U-Net are far from zero, so the tests can fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interp import ClevrPipeline, Denoiser
from interp.clevr.train import build_pipeline, get_recipe
from interp.models.clevr import clevr_unet
from interp.models.clevr_local import ClevrLocalUNet, LocatedLocationEncoder, conditioner_radius, receptive_radius_px


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ClevrLocalUNet(block_out_channels=(16, 32), cross_attention_dim=16, attention_head_dim=8).double()
    # random, non-trivial weights everywhere (zero-initialised layers would hide dependencies)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _tokens(enc: LocatedLocationEncoder, locs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    tok, mask = enc(torch.tensor([locs], dtype=torch.float64))
    return tok, mask


def test_pixel_dependence_vanishes_outside_the_receptive_radius(model):
    R = receptive_radius_px(model)
    assert 4 <= R <= 10, R
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    tok = torch.zeros(1, 1, 16, dtype=torch.float64)
    out = model(x, 300, tok).sample
    for r, c in [(16, 16), (5, 27), (30, 2)]:
        (g,) = torch.autograd.grad(out[0, :, r, c].sum(), x, retain_graph=True)
        g = g.abs().sum(1)[0]
        rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
        far = torch.maximum((rows - r).abs(), (cols - c).abs()) > R
        assert g[far].max() <= 1e-6 * g.max(), "output depends on pixels outside the receptive radius"
        assert g[far].max() == 0.0
        assert g[~far].max() > 0


def test_conditioner_dependence_vanishes_outside_the_conditioner_radius(model):
    torch.manual_seed(1)
    enc = LocatedLocationEncoder(16).double()
    rc = conditioner_radius(model)
    assert 0.2 < rc < 0.25
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    near, far = [0.3, 0.3], [0.8, 0.75]
    base = model(x, 500, *_tokens(enc, [near])[:1], encoder_attention_mask=_tokens(enc, [near])[1]).sample
    tok, mask = _tokens(enc, [near, far])
    both = model(x, 500, tok, encoder_attention_mask=mask).sample
    diff = (both - base).abs().sum(1)[0]
    c = (torch.arange(32, dtype=torch.float64) + 0.5) / 32
    dist = torch.sqrt((c[None, :] - far[0]) ** 2 + (c[:, None] - far[1]) ** 2)
    outside = dist > rc
    assert diff[outside].max() <= 1e-6 * diff.max(), "pixels outside the radius moved when a far conditioner was added"
    # not exactly zero: one more (zero-weight) token changes the float summation order, ~1e-15
    assert diff[outside].max() <= 1e-12 * diff.max()
    assert diff[~outside].max() > 1e-3, "the conditioner should change pixels inside its radius"


def test_gradient_wrt_tokens_is_local(model):
    torch.manual_seed(2)
    enc = LocatedLocationEncoder(16).double()
    rc = conditioner_radius(model)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    tok, mask = _tokens(enc, [[0.2, 0.25], [0.75, 0.7]])
    tok = tok.detach().requires_grad_(True)
    out = model(x, 100, tok, encoder_attention_mask=mask).sample
    (g,) = torch.autograd.grad(out[0, :, 4, 4].sum(), tok)  # pixel (4, 4) is ~0.8 from the second object
    assert g[0, 2].abs().max() == 0.0
    assert g[0, 1].abs().max() > 0
    assert math.dist([(4 + 0.5) / 32] * 2, [0.75, 0.7]) > rc


def test_standard_unet_is_not_local():
    """Contrast: GroupNorm and self-attention couple every pixel, so the same probe is far from zero."""
    torch.manual_seed(0)
    u = clevr_unet("tiny").double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    out = u(x, 300, torch.randn(1, 2, 32, dtype=torch.float64)).sample
    (g,) = torch.autograd.grad(out[0, :, 2, 2].sum(), x)
    g = g.abs().sum(1)[0]
    assert g[20:, 20:].max() > 1e-4 * g.max()


def test_local_pipeline_round_trips_and_runs_through_the_denoiser(tmp_path):
    pipe = build_pipeline(get_recipe("exp3"), seed=0)
    pipe.save_pretrained(tmp_path / "p")
    back = ClevrPipeline.from_pretrained(tmp_path / "p", dtype=torch.float32)
    assert type(back.unet) is ClevrLocalUNet and type(back.location_encoder) is LocatedLocationEncoder
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, back.unet.state_dict()[k])
    den = back.denoiser()
    assert isinstance(den, Denoiser)
    cond = back.conditioning([[0.3, 0.3], [0.7, 0.7]])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y1 = den(x, 500, cond)
    y2 = pipe.denoiser()(x, 500, pipe.conditioning([[0.3, 0.3], [0.7, 0.7]]))
    assert y1.shape == (2, 3, 32, 32) and torch.equal(y1, y2)
    # dropping conditioner 1 leaves pixels far from it unchanged
    y3 = den(x, 500, cond.drop(1))
    assert torch.equal(y1[..., :8, :8], y3[..., :8, :8]) and not torch.equal(y1, y3)


def test_bad_token_width_raises():
    m = ClevrLocalUNet(block_out_channels=(16, 32), cross_attention_dim=16, attention_head_dim=8)
    with pytest.raises(ValueError, match="location channels"):
        m(torch.zeros(1, 3, 32, 32), 10, torch.zeros(1, 1, 12))
    with pytest.raises(ValueError, match="exceed"):
        LocatedLocationEncoder(3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LocatedLocationEncoder(16).conditioning([[1.5, 0.2]])
