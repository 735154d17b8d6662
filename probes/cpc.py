"""The CPC residual *(ours)*: how far is the score from a masked composition of single-conditioner scores?

If the model's distribution is a conditional projective composition (SCIENCE.md §1), its score on the
region ``M_j`` of conditioner ``j`` is the single-conditioner score, and on the background the null score:

    s(x | c_J) = s(x | ∅) + Σ_j m_j ⊙ (s(x | c_j) − s(x | ∅)).

The residual is the relative distance between the two sides,

    ρ = ‖s(x|c_J) − [s(x|∅) + Σ_j m_j ⊙ (s(x|c_j) − s(x|∅))]‖ / ‖s(x|c_J) − s(x|∅)‖,

zero for an exactly CPC model, and costs ``k + 2`` forward passes per sample. It is the same for the score
and for an ε-prediction (they differ by a factor ``−1/σ_t`` common to every term) and for v / x₀
predictions (the ``x``-dependent offsets cancel in the differences), so it is computed on the score.

Masks *(ours)*: ``m_j`` is the disc of radius ``r`` (normalised units) around ``c_j``'s location,
restricted to the pixels nearest to ``c_j`` so the masks stay disjoint when discs overlap. Also
reported: the residual restricted to the union of the discs and to the background, and a per-pixel
residual map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from interp import Conditioning, Denoiser
from interp.inputs import as_seeds, check_conditioning, check_locations, noisy_inputs
from interp.evaluate import accumulation_dtype, evaluate
from interp.masks import composition_masks, masked_composition
from interp.results import ProbeResult


def cpc_residual(
    den: Denoiser,
    cond: Conditioning,
    t: float | Sequence[float] | None = None,
    seeds: int | Sequence[int] = 4,
    *,
    x_t: Tensor | None = None,
    timestep: Tensor | float | int | None = None,
    radius: float = 0.2,
    x0: Tensor | None = None,
    shape: Sequence[int] | None = None,
    branch: Literal["cond", "guided"] = "cond",
    max_conditioners: int = 64,
    dtype: torch.dtype = torch.float32,
) -> ProbeResult:
    """CPC residual per noise level and sample.

    Args:
        den: the denoiser. cond: conditioning with ``k >= 1`` located conditioners.
        t: noise fraction(s) in ``[0, 1]``. seeds: forward-process samples.
        x_t / timestep: explicit inputs ``(S, C, H, W)`` and their noise level (``t`` one fraction, or
            ``timestep``) instead of forward-process samples (:func:`interp.inputs.noisy_inputs`).
        radius: mask radius in normalised Euclidean units (a fraction of the image side).
        x0, shape, dtype: forward-process inputs.
        branch: ``"cond"`` or ``"guided"`` (every term then uses CFG with the denoiser's scale).

    Returns:
        :class:`ProbeResult` with map ``"residual" (T, H, W)`` (per-pixel ‖·‖ over channels, mean over
        samples), ``"masks" (k, H, W)``, and rows ``cpc_residual``, ``cpc_residual_regions``,
        ``cpc_residual_background`` per ``(t, seed)`` plus their means over seeds (``seed = None``, ``stat = "mean"``).
    """
    check_conditioning(cond, need_locations=True, max_k=max_conditioners)
    check_locations(cond.locations)
    inputs = noisy_inputs(den, t, seeds, x_t=x_t, timestep=timestep, x0=x0, shape=shape, dtype=dtype)
    levels = [level for level, _, _ in inputs]
    # Rows are per sample: the seed when inputs come from the forward process, the sample index otherwise.
    seed_list = as_seeds(seeds) if x_t is None else list(range(x_t.shape[0]))
    cond = cond.to(den.device)
    result = ProbeResult(
        "cpc_residual",
        metadata={**den.metadata(), "site": "output", "branch": branch, "radius": radius, "k": cond.k,
                  "seeds": seed_list if x_t is None else "x_t given", "n_samples": len(seed_list), "levels": levels},
    )
    res_maps = []
    masks = None
    for level, xs, ts in inputs:
        acc = accumulation_dtype(xs)
        masks = composition_masks(cond.locations, tuple(xs.shape[-2:]), radius).to(xs.device)

        def score(c: Conditioning) -> Tensor:
            with torch.no_grad():
                return evaluate(den, xs, ts, c, branch=branch, quantity="score").to(acc)

        full, null = score(cond), score(cond.null())
        comp = masked_composition(null, [score(cond.only(j)) for j in range(cond.k)], masks)
        diff = full - comp
        denom = (full - null).flatten(1).norm(dim=1).clamp_min(1e-30)
        region = masks.sum(0).clamp(max=1).to(acc)
        rows = {
            "cpc_residual": diff.flatten(1).norm(dim=1) / denom,
            "cpc_residual_regions": (diff * region).flatten(1).norm(dim=1) / denom,
            "cpc_residual_background": (diff * (1 - region)).flatten(1).norm(dim=1) / denom,
        }
        for name, vals in rows.items():
            for s, seed in enumerate(seed_list):
                result.add(name, float(vals[s]), t=level, timestep=int(ts), seed=seed)
            result.add(name, float(vals.mean()), t=level, timestep=int(ts), seed=None, stat="mean")
        res_maps.append(diff.pow(2).sum(1).sqrt().mean(0).float())
    result.maps["residual"] = torch.stack(res_maps)
    result.axes["residual"] = ("t", "row", "col")
    result.maps["masks"] = masks.float()
    result.axes["masks"] = ("conditioner", "row", "col")
    return result
