"""The detector on rendered scenes with 0–10 objects (clean, noisy, blurred), and the matching metrics.

The detector's parameters were set on scenes from seed 1000; these tests use other seeds.
"""

from __future__ import annotations

import numpy as np
import pytest

from interp.clevr.detect import degrade, detect
from interp.clevr.metrics import count_stats, match
from interp.clevr.render import render_random

COUNTS = np.repeat(np.arange(11), 12)


@pytest.fixture(scope="module")
def scenes():
    return render_random(2024, COUNTS, 32)


@pytest.mark.parametrize("noise,blur", [(0.0, 0.0), (0.0, 1.0), (0.03, 0.6), (0.05, 0.6)])
def test_counts_and_locations_on_rendered_scenes(scenes, noise, blur):
    imgs = scenes.images if noise == blur == 0 else degrade(scenes.images, seed=5, noise=noise, blur=blur)
    det = detect(imgs)
    acc = (det.counts == COUNTS).mean()
    assert acc >= 0.97, f"count accuracy {acc:.3f} with noise={noise}, blur={blur}"
    sc = scenes.scene
    req = [sc.positions[b][sc.valid[b]] for b in range(len(COUNTS))]
    matched = sum(len(match(r, d)) for r, d in zip(req, det.positions))
    assert matched / COUNTS.sum() >= 0.97


def test_detector_reads_model_range_and_rejects_bad_shapes(scenes):
    a = detect(scenes.images[:20])
    b = detect(scenes.images[:20] * 2 - 1, value_range="-11")
    assert (a.counts == b.counts).all()
    with pytest.raises(ValueError, match=r"\(B, 3, H, H\)"):
        detect(np.zeros((2, 1, 32, 32), np.float32))


def test_match_is_one_to_one_within_the_radius():
    req = np.array([[0.2, 0.2], [0.5, 0.5]])
    det = np.array([[0.21, 0.2], [0.23, 0.2], [0.9, 0.9]])
    pairs = match(req, det, radius=0.1)
    assert pairs == [(0, 0)]
    assert match(req, np.zeros((0, 2))) == []


def test_count_stats_pools_over_images():
    req = [np.array([[0.2, 0.2], [0.6, 0.6]]), np.array([[0.3, 0.7], [0.7, 0.3]])]
    det = [np.array([[0.2, 0.21], [0.61, 0.6]]), np.array([[0.3, 0.7], [0.7, 0.3], [0.5, 0.5]])]
    s = count_stats(2, req, det)
    assert s.count_acc == 0.5 and s.recall == 1.0 and s.precision == pytest.approx(4 / 5)
    assert s.mean_count == 2.5 and s.mean_extra == 0.5 and s.error_hist == {0: 1, 1: 1}
    empty = count_stats(0, [np.zeros((0, 2))], [np.zeros((0, 2))])
    assert empty.count_acc == 1.0 and np.isnan(empty.recall) and np.isnan(empty.precision)
