"""The standard (global) CLEVR U-Net, plus two input channels holding each pixel's coordinates.

A location-conditioned model must map "a token says (x, y)" to "draw at pixel (x, y)". Convolutions are
translation-equivariant and diffusers' attention blocks carry no positional embedding, so a plain
``UNet2DConditionModel`` can only infer *where* a pixel is from zero-padding effects at the border: on the
2-core CPU budget it had barely started to use its conditioner after 600 steps (conditional change of the
output 0.2 % of its norm at t = 900). Appending the pixel's normalised ``(x, y)`` to the input (CoordConv;
Liu et al. 2018) gives every query its position from the first layer. *(ours)*: the paper does not say how
its U-Net knows pixel positions.

The model is still **global** — GroupNorm, self-attention and cross-attention to every token are untouched —
and it *is* a ``UNet2DConditionModel`` (same module tree, same site paths, ``set_attn_processor`` etc.):
only ``conv_in`` takes ``in_channels + 2`` channels and ``forward`` appends the coordinates. The config's
``in_channels`` stays the image's channel count, so :class:`~interp.Denoiser` sees an ordinary U-Net.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401 - diffusers looks ModelMixin up in this module when loading
from torch import Tensor, nn

#: Extra input channels: x and y of each pixel centre, in [-1, 1].
COORD_CHANNELS = 2


def coordinate_channels(sample: Tensor) -> Tensor:
    """``(B, 2, H, W)`` pixel-centre coordinates ``(x, y)`` in [-1, 1] matching ``sample``'s device/dtype."""
    B, _, H, W = sample.shape
    ys = (torch.arange(H, device=sample.device, dtype=sample.dtype) + 0.5) / H * 2 - 1
    xs = (torch.arange(W, device=sample.device, dtype=sample.dtype) + 0.5) / W * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), 0)  # (2, H, W): x varies along W
    return grid.unsqueeze(0).expand(B, -1, -1, -1)


class CoordUNet2DConditionModel(UNet2DConditionModel):
    """``UNet2DConditionModel`` whose input gets two coordinate channels (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conv = self.conv_in
        self.conv_in = nn.Conv2d(
            conv.in_channels + COORD_CHANNELS, conv.out_channels, conv.kernel_size, padding=conv.padding
        )

    def forward(self, sample: Tensor, *args: Any, **kwargs: Any):  # noqa: D102 - UNet2DConditionModel.forward
        return super().forward(torch.cat([sample, coordinate_channels(sample)], dim=1), *args, **kwargs)


# diffusers builds models from configs by reading the __init__ signature: give it the parent's.
CoordUNet2DConditionModel.__init__.__signature__ = inspect.signature(UNet2DConditionModel.__init__)  # type: ignore[attr-defined]
CoordUNet2DConditionModel.forward.__signature__ = inspect.signature(UNet2DConditionModel.forward)  # type: ignore[attr-defined]
