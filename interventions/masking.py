"""Distance-masked cross-attention: an attention processor that adds a distance bias and delegates.

The processor never re-implements attention: it extends the additive mask diffusers already passes
(``attention_mask``: the ``encoder_attention_mask`` bias, ``(B, 1, L)`` with ``-10000`` on padded tokens, or
``None``) to a per-query ``(B, N, L)`` bias and calls the module's **original** processor with it. When the
distance mask hides nothing, the original processor gets the original arguments, so a radius beyond the
image diagonal is bit-identical to no edit.

Grid (PITFALLS): ``attn2`` sees ``(B, N, C)`` hidden states flattened row-major from an ``h × w`` grid with
``h · w = N`` and the U-Net input's aspect ratio; cell centres are ``((j + ½)/w, (i + ½)/h)`` in the
normalised ``(x, y)`` of conditioner locations.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from interp.conditioning import Conditioning

MASKED = -10000.0
"""Bias of a hidden token: diffusers' own padding value (``exp(-10000)`` is exactly 0 in every float dtype)."""


def layer_grid(n: int, image_hw: tuple[int, int] | None) -> tuple[int, int]:
    """``(h, w)`` of a token sequence of length ``n`` with the input's aspect ratio (square if unknown)."""
    if image_hw is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} query tokens form no square grid and the U-Net input's (H, W) is unknown")
        return side, side
    H, W = image_hw
    scale = math.sqrt(H * W / n)
    h, w = round(H / scale), round(W / scale)
    if h * w != n:
        raise ValueError(f"{n} query tokens do not form a grid with the input's aspect ratio {H}x{W}")
    return h, w


def cell_centres(hw: tuple[int, int], device: Any = None) -> Tensor:
    """``(h·w, 2)`` float64 normalised ``(x, y)`` cell centres, row-major."""
    h, w = hw
    y = (torch.arange(h, dtype=torch.float64, device=device) + 0.5) / h
    x = (torch.arange(w, dtype=torch.float64, device=device) + 0.5) / w
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], 1)


def hidden_tokens(conds: list[Conditioning | None], selected: list[bool], n_keys: int, hw: tuple[int, int],
                  radius: float, site: str) -> Tensor | None:
    """``(B, N, L)`` bool, True where query ``q`` of row ``b`` must not see key ``l``; ``None`` if nothing is hidden.

    Raises:
        ValueError: a selected row without a Conditioning, conditioners without locations, more tokens than keys,
            or a row with no context token (a query far from every conditioner would see no key at all).
    """
    centres = cell_centres(hw)
    out: Tensor | None = None
    for b, (c, sel) in enumerate(zip(conds, selected)):
        if not sel:
            continue
        if not isinstance(c, Conditioning):
            raise ValueError(
                f"MaskCrossAttention at {site!r}: row {b} of this call has no announced Conditioning "
                f"({type(c).__name__}); call the model through an interp.Denoiser with Conditioning objects, "
                "not a ConditioningBatch or a raw pipeline call"
            )
        res = c.resolved()
        if res.k == 0:
            continue  # context tokens only: always visible
        if res.locations is None:
            raise ValueError(f"MaskCrossAttention at {site!r}: row {b}'s conditioning has {res.k} conditioners but "
                             "no locations; distance masking needs a location per conditioner")
        owner = res.owner.cpu()
        if owner.shape[0] > n_keys:
            raise ValueError(f"MaskCrossAttention at {site!r}: row {b}'s conditioning has {owner.shape[0]} tokens but "
                             f"the layer received {n_keys} keys; the announced conditionings do not match the call")
        if not (owner == -1).any():
            raise ValueError(f"MaskCrossAttention at {site!r}: row {b}'s conditioning has no context token (owner -1); "
                             "a query far from every conditioner would attend to nothing (softmax NaN)")
        loc = res.locations.detach().to("cpu", torch.float64)
        dist = torch.cdist(centres, loc)  # (N, k)
        visible = dist <= radius if radius > 0 else torch.zeros_like(dist, dtype=torch.bool)
        hide = torch.zeros((centres.shape[0], n_keys), dtype=torch.bool)
        cond_tok = torch.nonzero(owner >= 0).flatten()
        hide[:, cond_tok] = ~visible[:, owner[cond_tok]]
        if hide.any():
            if out is None:
                out = torch.zeros((len(conds), centres.shape[0], n_keys), dtype=torch.bool)
            out[b] = hide
    return out


class DistanceMaskedProcessor:
    """Wraps a module's original attention processor; the owning ``apply`` block decides per call what to hide.

    ``bias_for(attn, hidden_states, encoder_hidden_states)`` returns the ``(B, N, L)`` additive distance bias,
    or ``None`` to run the original processor with the original arguments.
    """

    def __init__(self, original: Any, bias_for: Any) -> None:
        self.original = original
        self._bias_for = bias_for

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs: Any) -> Tensor:
        # Keyword names matter: diffusers passes encoder_hidden_states= and attention_mask= by keyword and drops
        # any keyword argument the processor's signature does not name (PITFALLS).
        if temb is not None:
            kwargs["temb"] = temb
        bias = None if encoder_hidden_states is None else self._bias_for(attn, hidden_states, encoder_hidden_states)
        if bias is None:
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **kwargs)
        bias = bias.to(device=hidden_states.device, dtype=hidden_states.dtype)
        if attention_mask is not None:
            if attention_mask.dim() != 3 or attention_mask.shape[0] != bias.shape[0] or attention_mask.shape[-1] != bias.shape[-1]:
                raise ValueError(f"MaskCrossAttention: unexpected attention_mask of shape {tuple(attention_mask.shape)} "
                                 f"(expected diffusers' (B, 1, L) bias with B={bias.shape[0]}, L={bias.shape[-1]})")
            bias = attention_mask.to(bias.dtype) + bias
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=bias, **kwargs)


def is_cross_attention(module: Any) -> bool:
    """A diffusers ``Attention`` that attends to encoder tokens (``attn2``)."""
    return hasattr(module, "set_processor") and hasattr(module, "processor") and bool(getattr(module, "is_cross_attention", False))


__all__ = ["MASKED", "DistanceMaskedProcessor", "cell_centres", "hidden_tokens", "is_cross_attention", "layer_grid"]
