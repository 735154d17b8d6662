"""Composition masks: which pixels belong to which conditioner, and the masked composition built from them.

Conditional projective composition (SCIENCE.md §1) splits the image into disjoint regions ``M_j``, one per
conditioner, and a background. *(ours)*: ``M_j`` is the disc of radius ``radius`` (normalised Euclidean
units, the same part of the image at every resolution) around conditioner ``j``'s location, each pixel given
to its nearest conditioner so the regions never overlap. Probes (the CPC residual) and interventions (feature-
and score-level composition) use the same masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from interp.inputs import conditioner_distances


def composition_masks(locations: Tensor, hw: tuple[int, int], radius: float) -> Tensor:
    """``(k, H, W)`` disjoint float masks: the disc of radius ``radius`` around each location, each pixel
    given to its nearest conditioner."""
    if radius <= 0:
        raise ValueError(f"radius must be positive (normalised units), got {radius}")
    dist = conditioner_distances(locations, hw)
    nearest = dist.argmin(0)
    k = dist.shape[0]
    own = nearest[None] == torch.arange(k).view(k, 1, 1)
    return ((dist <= radius) & own).to(torch.float64)


def masked_composition(null: Tensor, singles: Sequence[Tensor], masks: Tensor) -> Tensor:
    """``null + Σ_j m_j ⊙ (single_j − null)`` for ``(B, C, H, W)`` scores and ``(k, H, W)`` masks."""
    comp = null.clone()
    for j, s in enumerate(singles):
        comp = comp + masks[j].to(null) * (s - null)
    return comp


__all__ = ["composition_masks", "masked_composition"]
