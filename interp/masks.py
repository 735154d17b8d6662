"""Composition masks: which pixels belong to which conditioner, and the masked composition built from them.

Conditional projective composition (SCIENCE.md §1) splits the image into disjoint regions ``M_j``, one per
conditioner, and a background. *(ours)*: ``M_j`` is the disc of radius ``radius`` (normalised Euclidean
units, the same part of the image at every resolution) around conditioner ``j``'s location, each pixel given
to its nearest conditioner so the regions never overlap. Probes (the CPC residual) and interventions (feature-
and score-level composition) use the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from interp.inputs import conditioner_distances


def composition_masks(locations: Tensor, hw: tuple[int, int], radius: float, soft: float = 0.0) -> Tensor:
    """``(k, H, W)`` float64 masks of the conditioners' regions, disjoint: each pixel belongs to its nearest
    conditioner only.

    ``soft = 0``: the disc of radius ``radius`` (0/1). ``soft > 0`` *(ours)*: 1 within ``radius``, a cosine edge
    ``½(1 + cos(π (d − radius)/soft))`` out to ``radius + soft``, 0 beyond. Both in normalised Euclidean units.
    """
    if not radius > 0:
        raise ValueError(f"radius must be positive (normalised units), got {radius}")
    if not soft >= 0:
        raise ValueError(f"soft must be >= 0 (normalised units), got {soft}")
    dist = conditioner_distances(locations, hw)
    k = dist.shape[0]
    own = dist.argmin(0)[None] == torch.arange(k).view(k, 1, 1)
    if soft == 0:
        return ((dist <= radius) & own).to(torch.float64)
    ramp = ((dist - radius) / soft).clamp(0, 1)
    return torch.where(own, 0.5 * (1 + torch.cos(math.pi * ramp)), torch.zeros_like(dist))


def masked_composition(null: Tensor, singles: Sequence[Tensor], masks: Tensor) -> Tensor:
    """``null + Σ_j m_j ⊙ (single_j − null)`` for ``(B, C, H, W)`` scores and ``(k, H, W)`` masks."""
    comp = null.clone()
    for j, s in enumerate(singles):
        comp = comp + masks[j].to(null) * (s - null)
    return comp


__all__ = ["composition_masks", "masked_composition"]
