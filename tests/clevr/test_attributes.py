"""Reading object colours off images, validated on rendered scenes (ground truth known), and colour accuracy.

``read_colours``' radius and gray threshold were set on scenes from seed 1000; these tests use other seeds.
"""

from __future__ import annotations

import numpy as np
import pytest

from interp.clevr.attributes import read_colours
from interp.clevr.detect import degrade, detect
from interp.clevr.metrics import colour_accuracy
from interp.clevr.render import COLOUR_NAMES, render_random


@pytest.fixture(scope="module")
def scenes():
    return render_random(2025, np.random.default_rng(3).integers(1, 11, 160), 32)


def _truth(r):
    pos = [r.scene.positions[b][r.scene.valid[b]] for b in range(len(r.images))]
    cols = [r.scene.colours[b][r.scene.valid[b]] for b in range(len(r.images))]
    return pos, cols


@pytest.mark.parametrize("noise,blur,floor", [(0.0, 0.0, 1.0), (0.03, 0.6, 0.98), (0.05, 0.6, 0.97)])
def test_colours_read_at_true_centres(scenes, noise, blur, floor):
    pos, cols = _truth(scenes)
    imgs = scenes.images if noise == 0 and blur == 0 else degrade(scenes.images, 9, noise=noise, blur=blur)
    got = np.concatenate(read_colours(imgs, pos))
    truth = np.concatenate(cols)
    assert len(truth) > 700 and set(truth.tolist()) == set(range(len(COLOUR_NAMES)))  # every colour is tested
    assert (got == truth).mean() >= floor


def test_colour_accuracy_through_the_detector(scenes):
    """The evaluation's path: detect, read colours at the detections, match to the requests."""
    pos, cols = _truth(scenes)
    det = detect(scenes.images)
    acc = colour_accuracy(pos, cols, det.positions, read_colours(scenes.images, det.positions))
    assert acc >= 0.98
    # swapping the requested colours (a model that ignores colour) scores near chance, so the metric can fail
    rng = np.random.default_rng(0)
    wrong = [(c + rng.integers(1, len(COLOUR_NAMES), size=len(c))) % len(COLOUR_NAMES) for c in cols]
    assert colour_accuracy(pos, wrong, det.positions, read_colours(scenes.images, det.positions)) <= 0.05


def test_bad_inputs_raise():
    img = np.zeros((2, 3, 8, 8), np.float32)
    with pytest.raises(ValueError, match="position sets"):
        read_colours(img, [np.zeros((1, 2))])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        read_colours(img[:, :1], [np.zeros((1, 2))] * 2)
    with pytest.raises(ValueError, match="one entry per image"):
        colour_accuracy([np.zeros((1, 2))], [], [np.zeros((1, 2))], [np.zeros(1)])
    assert np.isnan(colour_accuracy([np.zeros((0, 2))], [np.zeros(0)], [np.zeros((0, 2))], [np.zeros(0)]))
