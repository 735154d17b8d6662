"""The global CLEVR U-Net with coordinate channels: still a UNet2DConditionModel, round-trips, knows positions."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from interp import ClevrPipeline
from interp.models.coord_unet import CoordUNet2DConditionModel, coordinate_channels
from interp.clevr.train import build_pipeline, get_recipe


def test_coordinates_are_pixel_centres():
    c = coordinate_channels(torch.zeros(2, 3, 4, 8))
    assert c.shape == (2, 2, 4, 8)
    assert torch.allclose(c[0, 0, 0], (torch.arange(8) + 0.5) / 8 * 2 - 1)  # x varies along width
    assert torch.allclose(c[0, 1, :, 0], (torch.arange(4) + 0.5) / 4 * 2 - 1)  # y varies along height


def test_coord_unet_round_trips_and_is_a_standard_unet(tmp_path):
    pipe = build_pipeline(get_recipe("exp1"), seed=0)
    assert isinstance(pipe.unet, CoordUNet2DConditionModel) and isinstance(pipe.unet, UNet2DConditionModel)
    assert pipe.unet.config.in_channels == 3 and pipe.unet.conv_in.in_channels == 5
    pipe.save_pretrained(tmp_path / "p")
    back = ClevrPipeline.from_pretrained(tmp_path / "p", dtype=torch.float32)
    assert type(back.unet) is CoordUNet2DConditionModel
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = back.conditioning([[0.3, 0.3]])
    assert torch.equal(back.denoiser()(x, 300, cond), pipe.denoiser()(x, 300, cond))


def test_coordinates_break_translation_equivariance():
    """A shifted input gives a shifted output for a plain conv net; with coordinates it does not."""
    torch.manual_seed(0)
    u = CoordUNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16,
    )
    with torch.no_grad():
        u.conv_in.weight[:, 3:] = 0  # without the coordinate weights the output ignores them...
        x = torch.randn(1, 3, 32, 32)
        tok = torch.randn(1, 2, 32)
        a = u(x, 10, tok).sample
        u.conv_in.weight[:, 3:] = 1.0  # ...with them it changes
        b = u(x, 10, tok).sample
    assert (a - b).abs().max() > 1e-3
