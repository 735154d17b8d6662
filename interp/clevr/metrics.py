"""Length-generalisation metrics *(ours)*: did the model put the requested objects where asked?

For one image with requested locations ``R`` (``k × 2``) and detected centres ``D`` (``n × 2``):

* **count correct** — ``n == k``;
* **matches** — a one-to-one assignment between ``R`` and ``D`` minimising total distance (Hungarian,
  ``scipy.optimize.linear_sum_assignment``), keeping only pairs closer than ``radius``;
* **recall** ``= matches / k`` (requested objects that appeared where asked) and **precision**
  ``= matches / n`` (detections that answer a request). Over a set of images we pool the counts
  (micro-average: Σ matches / Σ k), so images with more objects weigh more; with ``k = 0`` recall is
  undefined (reported as NaN) and with no detection at all precision is NaN;
* **placement accuracy** — the fraction of images in which *every* requested location is filled (matches
  ``== k``; ../shared/SCIENCE.md §2). Unrequested extra objects do not count against it, so for models
  trained on Exp2's data (whose background factor holds objects) it measures length generalisation where
  count accuracy is confounded. With ``k = 0`` every image places its (no) objects: 1.0.

Binomial 95 % intervals for these fractions: :func:`wilson_interval`.

The default radius, 0.1 (3.2 px at 32×32), is half the renderer's minimum object separation: a detection
can then match at most one requested location unambiguously.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

#: Matching radius in normalised units (half of :data:`interp.clevr.render.MIN_SEPARATION`, rounded).
MATCH_RADIUS: float = 0.1


def match(requested: np.ndarray, detected: np.ndarray, radius: float = MATCH_RADIUS) -> list[tuple[int, int]]:
    """Hungarian matching of ``(k, 2)`` requested and ``(n, 2)`` detected positions within ``radius``.

    Returns the matched ``(request index, detection index)`` pairs.
    """
    requested = np.asarray(requested, dtype=np.float64).reshape(-1, 2)
    detected = np.asarray(detected, dtype=np.float64).reshape(-1, 2)
    if len(requested) == 0 or len(detected) == 0:
        return []
    cost = np.linalg.norm(requested[:, None] - detected[None], axis=-1)
    # pairs beyond the radius may not be matched: make them too expensive to be worth it
    big = cost.max() + 1e3
    rows, cols = linear_sum_assignment(np.where(cost <= radius, cost, big))
    return [(int(r), int(c)) for r, c in zip(rows, cols) if cost[r, c] <= radius]


@dataclass(frozen=True)
class CountStats:
    """Metrics of a set of images that all requested ``k`` objects.

    Attributes:
        k: requested count. n: images. count_acc: P(detected = k). recall / precision: pooled (see module).
        placement_acc: fraction of images whose every requested location is matched (extras allowed).
        mean_count: mean detected count. mean_extra: detections matched to no request, per image (objects
        nobody asked for). error_hist: ``{detected − k: images}``.
    """

    k: int
    n: int
    count_acc: float
    recall: float
    precision: float
    mean_count: float
    mean_extra: float
    error_hist: dict[int, int]
    placement_acc: float = float("nan")

    def as_dict(self) -> dict:
        return {
            "k": self.k,
            "n": self.n,
            "count_acc": self.count_acc,
            "recall": self.recall,
            "precision": self.precision,
            "placement_acc": self.placement_acc,
            "mean_count": self.mean_count,
            "mean_extra": self.mean_extra,
            "error_hist": {str(e): c for e, c in sorted(self.error_hist.items())},
        }


def count_stats(k: int, requested: Sequence[np.ndarray], detected: Sequence[np.ndarray], radius: float = MATCH_RADIUS) -> CountStats:
    """Pool the metrics over images that all requested ``k`` locations (lists of ``(k, 2)`` / ``(n_i, 2)``)."""
    if len(requested) != len(detected):
        raise ValueError(f"{len(requested)} requested sets for {len(detected)} detection sets")
    n = len(requested)
    if n == 0:
        raise ValueError("no images to score")
    counts = np.array([len(d) for d in detected])
    per_image = [len(match(r, d, radius)) for r, d in zip(requested, detected)]
    matched = sum(per_image)
    # every requested location filled; np.reshape so an empty (0, 2) request counts as placed
    placed = [m == len(np.asarray(r).reshape(-1, 2)) for m, r in zip(per_image, requested)]
    n_req = sum(len(r) for r in requested)
    n_det = int(counts.sum())
    errors, freq = np.unique(counts - k, return_counts=True)
    return CountStats(
        k=k,
        n=n,
        count_acc=float((counts == k).mean()),
        recall=float(matched / n_req) if n_req else float("nan"),
        precision=float(matched / n_det) if n_det else float("nan"),
        mean_count=float(counts.mean()),
        mean_extra=float((n_det - matched) / n),
        error_hist={int(e): int(c) for e, c in zip(errors, freq)},
        placement_acc=float(np.mean(placed)),
    )


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % for ``z = 1.96``); ``(nan, nan)`` for no trials.

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and is not degenerate at 0 or 1
    successes — the common case here (count accuracy 0.00 at k = 6).
    """
    if isinstance(successes, bool) or isinstance(trials, bool):
        raise TypeError("successes and trials must be integers, not booleans")
    successes, trials = int(successes), int(trials)
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"need 0 <= successes <= trials, got successes={successes}, trials={trials}")
    if trials == 0:
        return float("nan"), float("nan")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def colour_accuracy(
    requested: Sequence[np.ndarray],
    requested_colours: Sequence[np.ndarray],
    detected: Sequence[np.ndarray],
    detected_colours: Sequence[np.ndarray],
    radius: float = MATCH_RADIUS,
) -> float:
    """Among matched (request, detection) pairs, the fraction drawn in the requested colour (pooled).

    ``requested`` / ``detected``: per image ``(k, 2)`` / ``(n, 2)`` positions; ``requested_colours`` /
    ``detected_colours``: per image palette indices ``(k,)`` / ``(n,)`` (the latter read off the image by
    :func:`interp.clevr.attributes.read_colours`). Unmatched requests do not count (recall covers them);
    NaN when nothing matched.
    """
    if not len(requested) == len(requested_colours) == len(detected) == len(detected_colours):
        raise ValueError("requested, requested_colours, detected and detected_colours must have one entry per image")
    right = total = 0
    for r, rc, d, dc in zip(requested, requested_colours, detected, detected_colours):
        for i, j in match(r, d, radius):
            total += 1
            right += int(np.asarray(rc)[i] == np.asarray(dc)[j])
    return right / total if total else float("nan")
