"""Scalar summaries of locality maps: how concentrated is a map's mass, and where does it lie.

Pixel-locality (Niedoba et al. 2024, Eq. 8) summarises the aggregate Jacobian map ``G(i, ·)`` of an
output pixel ``i`` by the **side of the centred square** and the **radius** of the centred disc that hold
a fraction ``q`` (50 / 75 / 95 %) of its mass, and by the **participation ratio** ``(ΣG)² / ΣG²``: the
number of input pixels the map is effectively spread over (1 for a delta, ``H·W`` for a flat map).

Conditional-locality summaries are *(ours)* (the paper gives maps, not numbers): for conditioner ``j``
with location ``ℓ_j`` and radius ``r`` (normalised units),

* **in-region fraction** — mass within ``r`` of ``ℓ_j``;
* **leakage to others** — mass outside that disc at pixels nearer another conditioner than ``ℓ_j``;
* **background leakage** — the rest (outside the disc, nearest to ``ℓ_j`` itself but beyond ``r``);
  the three fractions sum to one;
* **effective number of conditioners** at pixel ``i`` — the participation ratio over ``j`` of
  ``G_c(i, j)``: 1 where one conditioner alone moves the pixel, ``k`` where all do equally.

All functions take batched maps ``(..., H, W)`` and accumulate in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from interp.inputs import conditioner_distances

DEFAULT_QUANTILES: tuple[float, ...] = (0.5, 0.75, 0.95)


def _check_map(g: Tensor) -> Tensor:
    if g.dim() < 2:
        raise ValueError(f"a locality map must be (..., H, W), got shape {tuple(g.shape)}")
    g = g.detach().to("cpu", torch.float64)  # summaries are cheap: always on CPU
    if not torch.isfinite(g).all():
        raise ValueError("locality map contains NaN or Inf; the model output or its derivative is not finite")
    if (g < 0).any():
        raise ValueError("locality maps are non-negative masses (abs or norms); got negative entries")
    return g


def participation_ratio(g: Tensor) -> Tensor:
    """``(ΣG)² / ΣG²`` over the last two axes; ``(...)`` float64 (0 for an all-zero map)."""
    g = _check_map(g).flatten(-2)
    s1, s2 = g.sum(-1), (g**2).sum(-1)
    return torch.where(s2 > 0, s1**2 / s2.clamp_min(1e-300), torch.zeros_like(s1))


def _first_reaching(sorted_mass: Tensor, q: float) -> Tensor:
    total = sorted_mass.sum(-1, keepdim=True)
    cum = sorted_mass.cumsum(-1) / total.clamp_min(1e-300)
    return (cum >= q - 1e-12).to(torch.int8).argmax(-1)


def mass_square_side(g: Tensor, centres: Tensor, q: float) -> Tensor:
    """Side ``2h + 1`` of the smallest square centred on each pixel holding fraction ``q`` of its map.

    Args:
        g: ``(P, H, W)`` maps, one per centre.
        centres: ``(P, 2)`` ``(row, col)`` centre of each map.
        q: mass fraction in ``(0, 1]``.

    Returns:
        ``(P,)`` int64 sides (a square clipped by the image border counts with its nominal side).
    """
    g = _check_map(g)
    P, H, W = g.shape
    rr = torch.arange(H).view(1, H, 1)
    cc = torch.arange(W).view(1, 1, W)
    c = centres.to(torch.long)
    d = torch.maximum((rr - c[:, 0].view(P, 1, 1)).abs(), (cc - c[:, 1].view(P, 1, 1)).abs())
    hmax = int(max(H, W))
    by_ring = torch.zeros(P, hmax + 1, dtype=torch.float64).scatter_add_(1, d.flatten(1), g.flatten(1))
    return 2 * _first_reaching(by_ring, q).long() + 1


def mass_radius(g: Tensor, centres: Tensor, q: float) -> Tensor:
    """Radius (pixels, Euclidean) of the smallest centred disc holding fraction ``q`` of each map; ``(P,)``."""
    g = _check_map(g)
    P, H, W = g.shape
    rr = torch.arange(H, dtype=torch.float64).view(1, H, 1)
    cc = torch.arange(W, dtype=torch.float64).view(1, 1, W)
    c = centres.to(torch.float64)
    d = ((rr - c[:, 0].view(P, 1, 1)) ** 2 + (cc - c[:, 1].view(P, 1, 1)) ** 2).sqrt().flatten(1)
    d_sorted, order = d.sort(-1)
    idx = _first_reaching(g.flatten(1).gather(1, order), q)
    return d_sorted.gather(1, idx.view(P, 1)).view(P)


def mass_outside(g: Tensor, support: Tensor) -> Tensor:
    """Fraction of each map's mass outside a boolean ``support`` (broadcastable to ``g``); ``(...)``."""
    g = _check_map(g)
    total = g.flatten(-2).sum(-1)
    out = (g * (~support.to("cpu", torch.bool)).to(torch.float64)).flatten(-2).sum(-1)
    return torch.where(total > 0, out / total.clamp_min(1e-300), torch.zeros_like(total))


def pixel_summaries(g: Tensor, centres: Tensor, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, Tensor]:
    """All pixel-locality summaries of ``(P, H, W)`` maps: ``side_q``, ``radius_q`` per quantile, ``participation_ratio``."""
    out: dict[str, Tensor] = {}
    for q in quantiles:
        if not 0 < q <= 1:
            raise ValueError(f"mass quantiles must lie in (0, 1], got {q}")
        tag = f"{round(100 * q)}"
        out[f"side_{tag}"] = mass_square_side(g, centres, q).to(torch.float64)
        out[f"radius_{tag}"] = mass_radius(g, centres, q)
    out["participation_ratio"] = participation_ratio(g)
    return out


def region_fractions(g: Tensor, locations: Tensor, radius: float) -> dict[str, Tensor]:
    """In-region / leakage fractions of per-conditioner maps *(ours)*.

    Args:
        g: ``(k, H, W)`` non-negative map of each conditioner (row ``j`` belongs to conditioner ``j``).
        locations: ``(k, 2)`` normalised ``(x, y)`` of the conditioners.
        radius: disc radius in normalised units (fraction of the image width/height).

    Returns:
        ``in_region``, ``leak_other``, ``leak_background``: each ``(k,)`` float64, summing to 1 per row
        (all zero for a conditioner whose map is identically zero).
    """
    g = _check_map(g)
    k, H, W = g.shape
    if locations.shape[0] != k:
        raise ValueError(f"{k} maps but {locations.shape[0]} conditioner locations")
    if radius <= 0:
        raise ValueError(f"radius must be positive (normalised units), got {radius}")
    dist = conditioner_distances(locations, (H, W))  # (k, H, W)
    inside = dist <= radius
    nearest = dist.argmin(0)  # (H, W)
    total = g.flatten(1).sum(-1).clamp_min(1e-300)
    nz = g.flatten(1).sum(-1) > 0
    res = {"in_region": [], "leak_other": [], "leak_background": []}
    for j in range(k):
        other = (~inside[j]) & (nearest != j) & (dist[j] > dist.min(0).values)
        back = (~inside[j]) & ~other
        for name, m in (("in_region", inside[j]), ("leak_other", other), ("leak_background", back)):
            res[name].append((g[j] * m).sum() / total[j])
    return {n: torch.where(nz, torch.stack(v), torch.zeros(k, dtype=torch.float64)) for n, v in res.items()}


def effective_conditioners(g: Tensor) -> tuple[Tensor, Tensor]:
    """Participation ratio over conditioners at each pixel *(ours)*.

    Args:
        g: ``(k, H, W)`` non-negative per-conditioner maps.

    Returns:
        ``(H, W)`` map of ``(Σ_j g_j)² / Σ_j g_j²`` (0 where no conditioner acts) and its mass-weighted
        mean over pixels (a scalar tensor).
    """
    g = _check_map(g)
    s1, s2 = g.sum(0), (g**2).sum(0)
    n_eff = torch.where(s2 > 0, s1**2 / s2.clamp_min(1e-300), torch.zeros_like(s1))
    mean = (n_eff * s1).sum() / s1.sum().clamp_min(1e-300)
    return n_eff, mean


def hoyer_sparsity(v: Tensor) -> Tensor:
    """Hoyer's sparsity of the flattened last axes: 1 for one non-zero entry, 0 for a flat vector."""
    v = v.detach().to(torch.float64).flatten().abs()
    n = v.numel()
    if n < 2:
        return torch.tensor(1.0, dtype=torch.float64)
    l1, l2 = v.sum(), v.norm()
    if l2 == 0:
        return torch.tensor(0.0, dtype=torch.float64)
    return (n**0.5 - l1 / l2) / (n**0.5 - 1)


def support_fraction(v: Tensor, q: float = 0.95) -> Tensor:
    """Smallest fraction of entries holding fraction ``q`` of the (absolute) mass: small = sparse."""
    v = v.detach().to(torch.float64).flatten().abs()
    if v.sum() == 0:
        return torch.tensor(0.0, dtype=torch.float64)
    s = v.sort(descending=True).values
    idx = int(_first_reaching(s.view(1, -1), q)[0])
    return torch.tensor((idx + 1) / v.numel(), dtype=torch.float64)


def channel_masses(g: Tensor) -> Tensor:
    """Dependence mass of each channel: ``(..., C, h, w)`` non-negative maps → ``(..., C)`` sums over positions (float64)."""
    if g.dim() < 3:
        raise ValueError(f"per-channel maps must be (..., C, h, w), got shape {tuple(g.shape)}")
    return _check_map(g).flatten(-2).sum(-1)


def channel_sparsity(g: Tensor, q: float = 0.9) -> dict[str, Tensor]:
    """How few channels carry one conditioner's dependence at a layer *(ours)*.

    With ``m_c = Σ_{positions} g[c]`` the mass of channel ``c`` (:func:`channel_masses`):

    * ``channel_support`` — the smallest fraction of channels holding fraction ``q`` of ``Σ m``
      (:func:`support_fraction`); ``n/C`` when ``n`` channels share the mass equally and ``ceil(q·n) = n``;
    * ``channel_pr`` — the participation ratio ``(Σ m)² / Σ m²`` over channels (:func:`participation_ratio`):
      ``n`` for ``n`` equal channels, 1 for one;
    * ``channel_hoyer`` — Hoyer's sparsity of ``m`` (:func:`hoyer_sparsity`): ``(√C − √n) / (√C − 1)`` for ``n``
      equal channels out of ``C``.

    Args:
        g: ``(k, C, h, w)`` non-negative per-channel maps, one per conditioner (``(C, h, w)`` for one).
        q: mass fraction in ``(0, 1]``.

    Returns:
        each name → ``(k,)`` float64 (``()`` for a single ``(C, h, w)`` map); all 0 for an all-zero map.
    """
    if not 0 < q <= 1:
        raise ValueError(f"q must lie in (0, 1], got {q}")
    single = g.dim() == 3
    m = channel_masses(g.unsqueeze(0) if single else g)  # (k, C)
    if m.dim() != 2:
        raise ValueError(f"channel_sparsity takes (k, C, h, w) or (C, h, w) maps, got shape {tuple(g.shape)}")
    out = {
        "channel_support": torch.stack([support_fraction(row, q) for row in m]),
        "channel_pr": participation_ratio(m.unsqueeze(-2)),  # (k, 1, C): the ratio over the channel axis
        "channel_hoyer": torch.stack([hoyer_sparsity(row) for row in m]),
    }
    return {n: v[0] for n, v in out.items()} if single else out
