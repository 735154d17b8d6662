"""Length-generalisation metrics *(ours)*: did the model put the requested objects where asked?

For one image with requested locations ``R`` (``k × 2``) and detected centres ``D`` (``n × 2``):

* **count correct** — ``n == k``;
* **matches** — a one-to-one assignment between ``R`` and ``D`` minimising total distance (Hungarian,
  ``scipy.optimize.linear_sum_assignment``), keeping only pairs closer than ``radius``;
* **recall** ``= matches / k`` (requested objects that appeared where asked) and **precision**
  ``= matches / n`` (detections that answer a request). Over a set of images we pool the counts
  (micro-average: Σ matches / Σ k), so images with more objects weigh more; with ``k = 0`` recall is
  undefined (reported as NaN) and with no detection at all precision is NaN.

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

    def as_dict(self) -> dict:
        return {
            "k": self.k,
            "n": self.n,
            "count_acc": self.count_acc,
            "recall": self.recall,
            "precision": self.precision,
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
    matched = sum(len(match(r, d, radius)) for r, d in zip(requested, detected))
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
    )


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
