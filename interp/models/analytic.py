"""Analytic toy denoisers whose locality is known by construction — ground truth for the probes.

:class:`ToyUNet` has the ``UNet2DConditionModel`` call signature, so :class:`interp.Denoiser` wraps it
like any U-Net. Each conditioner token carries its own location in its first two coordinates
``(x, y)`` (normalised, x → columns) and features in the rest; context tokens sit far outside the image.

* ``kind="local"`` — **exactly local**: ``n_convs`` 3×3 convolutions (receptive-field radius
  ``n_convs`` pixels, Chebyshev), no normalisation, no pooling, no attention; conditioner ``j`` enters
  only through a compactly supported bump ``(1 − d²/r²)₊²`` around its location (``r = cond_radius``),
  so ``∂D/∂c_j`` vanishes identically outside that disc, and the output is *additive* over conditioners
  (the conditional projective composition holds exactly for well-separated conditioners).
* ``kind="global"`` — the same plus GroupNorm and a global self-attention-like mixing and conditioners
  injected everywhere: non-local in pixels and in conditioners.
* ``kind="linear"`` — linear in ``x`` and in the conditioner *features* (the bump uses the token's location,
  which gets no gradient): integrated gradients equal the JVP attribution exactly when the baseline keeps
  the locations (:func:`feature_baseline`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Literal

import torch
from torch import Tensor, nn

from interp import Conditioning, Denoiser

FAR = -10.0  # location of context tokens: far outside the image, so their bump is zero


class _Config(dict):
    """dict with attribute access, like diffusers' FrozenDict."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ToyUNet(nn.Module):
    """A hand-made denoiser with known locality (see the module docstring).

    Args:
        kind: ``"local"``, ``"global"`` or ``"linear"``.
        channels: image channels ``C``.
        size: image side ``H = W``.
        hidden: hidden channels.
        n_convs: number of 3×3 convolutions (pixel receptive-field radius).
        cond_dim: token width ``D`` (2 location coordinates + ``D − 2`` features).
        cond_radius: support radius of a conditioner's bump (normalised units).
        seed: weight initialisation seed.
    """

    def __init__(
        self,
        kind: Literal["local", "global", "linear"] = "local",
        *,
        channels: int = 3,
        size: int = 16,
        hidden: int = 8,
        n_convs: int = 2,
        cond_dim: int = 8,
        cond_radius: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in ("local", "global", "linear"):
            raise ValueError(f"kind must be 'local', 'global' or 'linear', got {kind!r}")
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.cond_radius = cond_radius
        self.config = _Config(in_channels=channels, out_channels=channels, sample_size=size, cross_attention_dim=cond_dim)
        chans = [channels] + [hidden] * n_convs
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.norm = nn.GroupNorm(2, hidden) if kind == "global" else None
        self.out = nn.Conv2d(hidden, channels, 1)
        self.feat = nn.Linear(cond_dim - 2, channels)
        self.mix = nn.Conv2d(hidden, channels, 1)
        self.inject = nn.Identity()  # a site: the conditioners' contribution, before it joins the output
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1))

    def _bumps(self, loc: Tensor, H: int, W: int) -> Tensor:
        """``(B, L, H, W)`` bump of each token around its location."""
        y = (torch.arange(H, dtype=loc.dtype, device=loc.device) + 0.5) / H
        x = (torch.arange(W, dtype=loc.dtype, device=loc.device) + 0.5) / W
        d2 = (x.view(1, 1, 1, W) - loc[..., 0, None, None]) ** 2 + (y.view(1, 1, H, 1) - loc[..., 1, None, None]) ** 2
        return torch.relu(1 - d2 / self.cond_radius**2) ** 2

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        return_dict: bool = True,
        **kwargs: object,
    ):
        B, C, H, W = sample.shape
        t = torch.as_tensor(timestep, dtype=sample.dtype, device=sample.device).reshape(-1)
        gain = (1 + 0.5 * torch.cos(t / 1000.0)).reshape(-1, 1, 1, 1)
        h = sample
        for conv in self.convs:
            h = conv(h) * gain
            h = h if self.kind == "linear" else torch.tanh(h)
        if self.norm is not None:
            h = self.norm(h)
            attn = torch.softmax(h.flatten(2).mean(1), -1).view(B, 1, H, W)  # global mixing
            h = h + (h * attn).sum((2, 3), keepdim=True)
        tokens = encoder_hidden_states.to(sample.dtype)
        loc, feats = tokens[..., :2], tokens[..., 2:]
        if self.kind == "linear":
            loc = loc.detach()
        bumps = self._bumps(loc, H, W)  # (B, L, H, W)
        if self.kind == "global":
            bumps = torch.ones_like(bumps) * (loc[..., :1, None] > FAR / 2).to(sample.dtype)  # every pixel
        if encoder_attention_mask is not None:
            bumps = bumps * encoder_attention_mask.to(sample.dtype)[..., None, None]
        f = self.feat(feats)  # (B, L, C)
        if self.kind == "linear":
            inj = torch.einsum("blhw,blc->bchw", bumps, f)
        else:
            local = self.mix(h)  # (B, C, H, W)
            inj = torch.einsum("blhw,blchw->bchw", bumps, torch.tanh(f[..., None, None] + local[:, None]))
        out = self.out(h) + self.inject(inj)
        return (out,) if not return_dict else SimpleNamespace(sample=out)


def toy_conditioning(locations: Sequence[Sequence[float]], *, dim: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> Conditioning:
    """A :class:`Conditioning` for :class:`ToyUNet`: one context token far away, one token per location."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.as_tensor(locations, dtype=torch.float64).reshape(-1, 2)
    context = torch.cat([torch.full((1, 2), FAR, dtype=torch.float64), torch.randn(1, dim - 2, generator=g, dtype=torch.float64)], 1)
    groups = [torch.cat([loc[j : j + 1], torch.randn(1, dim - 2, generator=g, dtype=torch.float64)], 1) for j in range(loc.shape[0])]
    return Conditioning.from_tokens(
        context.to(dtype), [gr.to(dtype) for gr in groups], locations=loc.float(), labels=[f"obj{j}" for j in range(loc.shape[0])]
    )


def feature_baseline(cond: Conditioning) -> Tensor:
    """Integrated-gradients baseline that keeps token locations and zeroes token features, ``(L, D)``."""
    base = cond.tokens.clone()
    base[:, 2:] = 0
    return base


def toy_denoiser(kind: Literal["local", "global", "linear"] = "local", *, dtype: torch.dtype = torch.float32, **kwargs: object) -> Denoiser:
    """A :class:`Denoiser` over a :class:`ToyUNet` (DDPM schedule, ε-prediction)."""
    unet = ToyUNet(kind, **kwargs).to(dtype)  # type: ignore[arg-type]
    return Denoiser(unet, name=f"toy-{kind}")
