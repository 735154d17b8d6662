"""``effect``: how much a set of edits changes the denoiser's prediction, per noise level and seed.

For each noise fraction ``t`` and seed, the relative change ``‖D_edit − D‖ / ‖D‖`` of the prediction (or the
score) over the whole image, and inside / outside the union of discs of ``radius`` around the conditioners
(*ours*: the same discs as the composition masks, without the nearest-conditioner split).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from interp.conditioning import Conditioning
from interp.denoiser import Denoiser
from interp.inputs import conditioner_distances, noisy_inputs

from interventions.applied import apply
from interventions.edits import Edit


def _rel(diff: Tensor, ref: Tensor, mask: Tensor | None) -> float:
    if mask is not None:
        diff, ref = diff * mask, ref * mask
    den = float(ref.norm())
    return float(diff.norm()) / den if den > 0 else float("nan")


def effect(
    den: Denoiser,
    edits: Edit | Sequence[Edit],
    cond: Conditioning,
    *,
    t: float | Sequence[float],
    seeds: int | Sequence[int] = 1,
    radius: float | None = 0.15,
    branch: Literal["cond", "uncond", "guided"] = "cond",
    quantity: Literal["prediction", "score"] = "prediction",
):
    """Tidy frame of the relative change an edit makes to ``D(x_t, t, c)``.

    Args:
        den: the denoiser.
        edits: one edit or a list (installed together with :func:`interventions.apply`).
        cond: the conditioning (one for every sample).
        t: noise fraction(s) in ``[0, 1]``; inputs ``x_t`` come from :func:`interp.inputs.noisy_inputs` (one per seed).
        seeds: a count or a list of seeds.
        radius: disc radius (normalised units) around each conditioner for the inside/outside rows; ``None``:
            overall only (also when ``cond`` has no locations).
        branch: which prediction to compare (``"guided"`` uses the denoiser's guidance scale).
        quantity: ``"prediction"`` (raw ε / v / x₀) or ``"score"``.

    Returns:
        ``pandas.DataFrame`` with columns ``t, timestep, seed, region ("all" | "inside" | "outside"), value, edit,
        quantity, branch``; ``value`` = ‖D_edit − D‖ / ‖D‖ over that region of the ``(C, H, W)`` output.

    Raises:
        ValueError: if the edits fired on none of the calls (``steps=`` selects sampling steps, which these
            single calls outside a sampling loop do not have).
    """
    import pandas as pd

    if quantity not in ("prediction", "score"):
        raise ValueError(f"quantity must be 'prediction' or 'score', got {quantity!r}")
    if branch not in ("cond", "uncond", "guided"):
        raise ValueError(f"branch must be 'cond', 'uncond' or 'guided', got {branch!r}")
    edit_list = [edits] if isinstance(edits, Edit) else list(edits)

    def run(x: Tensor, ts: Tensor) -> Tensor:
        with torch.no_grad():
            if quantity == "score":
                return den.score(x, ts, cond, branch=branch)
            return den.predict(x, ts, cond, branch=branch)

    rows: list[dict[str, Any]] = []
    label = " + ".join(e.label for e in edit_list)
    fired = 0
    for level, x, ts in noisy_inputs(den, t, seeds):
        plain = run(x, ts)
        with apply(den, *edit_list) as applied:
            edited = run(x, ts)
        fired += len(applied.frame())
        masks: dict[str, Tensor | None] = {"all": None}
        if radius is not None and cond.locations is not None and cond.k:
            inside = (conditioner_distances(cond.locations, tuple(x.shape[-2:])) <= radius).any(0)
            masks["inside"] = inside.to(plain)
            masks["outside"] = (~inside).to(plain)
        seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
        for s, seed in enumerate(seed_list):
            for region, m in masks.items():
                rows.append({"t": level, "timestep": int(ts), "seed": int(seed), "region": region,
                             "value": _rel(edited[s] - plain[s], plain[s], m), "edit": label,
                             "quantity": quantity, "branch": branch})
    if not fired:
        raise ValueError(f"the edits ({label}) fired on none of the calls: effect() calls the model outside a sampling "
                         "loop (step None), so an edit restricted by steps= never applies; drop steps=, or check branch=")
    return pd.DataFrame(rows, columns=["t", "timestep", "seed", "region", "value", "edit", "quantity", "branch"])


__all__ = ["effect"]
