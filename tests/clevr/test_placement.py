"""Placement accuracy (every requested location filled) and the Wilson intervals, on hand-made detections."""

from __future__ import annotations

import math

import numpy as np
import pytest

from interp.clevr.evaluate import format_table
from interp.clevr.metrics import count_stats, wilson_interval

REQ = np.array([[0.2, 0.2], [0.5, 0.5], [0.8, 0.8]])


def test_placement_all_filled_one_missing_and_extras():
    near = REQ + 0.02  # every request answered within the 0.1 radius
    missing = near[:2]  # the third location stays empty
    extra = np.vstack([near, [[0.2, 0.8], [0.8, 0.2]]])  # all filled plus two objects nobody asked for
    s = count_stats(3, [REQ, REQ, REQ], [near, missing, extra])
    assert s.placement_acc == pytest.approx(2 / 3)  # images 1 and 3 place everything; extras do not matter
    assert s.count_acc == pytest.approx(1 / 3)  # unchanged metrics beside it: only image 1 has exactly 3
    assert s.recall == pytest.approx(8 / 9)
    assert s.mean_extra == pytest.approx(2 / 3)
    assert s.as_dict()["placement_acc"] == pytest.approx(2 / 3)


def test_placement_needs_each_location_not_just_enough_objects():
    # three detections, but two crowd one location: the count is right, the placement is not
    crowded = np.array([[0.2, 0.2], [0.5, 0.5], [0.5, 0.58]])
    s = count_stats(3, [REQ], [crowded])
    assert s.count_acc == 1.0 and s.placement_acc == 0.0
    far = REQ + 0.2  # every object beyond the match radius
    assert count_stats(3, [REQ], [far]).placement_acc == 0.0


def test_placement_with_nothing_requested_is_one():
    empty = np.zeros((0, 2))
    s = count_stats(0, [empty, empty], [empty, REQ[:1]])
    assert s.placement_acc == 1.0 and math.isnan(s.recall)


def test_format_table_shows_placement():
    row = count_stats(3, [REQ], [REQ]).as_dict()
    table = format_table({"per_k": [row]})
    head, _, body = table.splitlines()
    assert "placement_acc" in head
    cells = [c.strip() for c in body.strip("|").split("|")]
    assert cells[head.strip("|").replace(" ", "").split("|").index("placement_acc")] == "1.000"


def test_wilson_interval():
    lo, hi = wilson_interval(0, 64)
    assert lo == 0.0 and 0.04 < hi < 0.07  # not degenerate at zero successes (Wald would give [0, 0])
    lo, hi = wilson_interval(32, 64)
    assert lo == pytest.approx(0.3814, abs=1e-3) and hi == pytest.approx(0.6186, abs=1e-3)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson_interval(5, 4)
