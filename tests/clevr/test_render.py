"""The renderer: deterministic by seed, exact and consistent ground truth, clear errors on bad scenes."""

from __future__ import annotations

import numpy as np
import pytest

from interp.clevr.render import (
    COLOUR_NAMES,
    MARGIN,
    MAX_OBJECTS,
    MIN_SEPARATION,
    RADIUS,
    check_positions,
    floor,
    random_scene,
    render,
    render_random,
    sample_positions,
)


def test_same_seed_same_pixels_other_seed_other_pixels():
    a = render_random(3, [0, 2, 5, 10])
    b = render_random(3, [0, 2, 5, 10])
    c = render_random(4, [0, 2, 5, 10])
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (4, 3, 32, 32) and a.images.dtype == np.float32
    assert a.images.min() >= 0 and a.images.max() <= 1


def test_empty_scene_is_the_floor():
    r = render_random(0, [0, 0])
    assert np.allclose(r.images, floor(32)[None])
    assert r.masks.shape == (2, 0, 32, 32)


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_masks_are_disjoint_and_centred(size):
    counts = np.arange(MAX_OBJECTS + 1)
    r = render_random(11, counts, size)
    sc = r.scene
    assert (sc.counts == counts).all()
    assert r.masks.sum(1).max() <= 1, "object masks overlap"
    for b in range(len(counts)):
        for k in range(counts[b]):
            m = r.masks[b, k]
            assert m.sum() >= 4, "every object must cover some pixels"
            ys, xs = np.nonzero(m)
            centre = np.array([(xs + 0.5).mean() / size, (ys + 0.5).mean() / size])
            # cubes rotate and cylinders have caps, so the centroid sits within half a radius of the centre
            assert np.linalg.norm(centre - sc.positions[b, k]) < 0.5 * RADIUS["large"] + 1.0 / size
        assert not r.masks[b, counts[b]:].any(), "padded slots must have empty masks"
        pos = sc.positions[b, : counts[b]]
        assert ((pos >= MARGIN - 1e-6) & (pos <= 1 - MARGIN + 1e-6)).all()
        if counts[b] > 1:
            d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(counts[b]) * 9
            assert d.min() >= MIN_SEPARATION - 1e-6


def test_pixels_outside_masks_are_floor_or_shadow_and_inside_carry_the_colour():
    r = render_random(5, [6] * 8, 32)
    bg = floor(32)[None]
    outside = ~r.masks.any(1)[:, None].repeat(3, 1)
    inside_cover = r.coverage.sum(1)[:, None].repeat(3, 1) > 0
    ratio = r.images[outside & ~inside_cover] / np.broadcast_to(bg, r.images.shape)[outside & ~inside_cover]
    assert ratio.min() > 0.79 and ratio.max() < 1.0 + 1e-5, "background must be the floor, at most 20 % darker (shadow)"
    sc = r.scene
    for name, channel in (("red", 0), ("green", 1), ("blue", 2)):
        hits = np.argwhere((sc.colours == COLOUR_NAMES.index(name)) & sc.valid)
        for b, k in hits:
            rgb = r.images[b][:, r.masks[b, k]].mean(1)
            assert rgb.argmax() == channel, f"a {name} object should be mostly {name}, got {rgb}"


def test_same_scene_at_two_resolutions_puts_objects_at_the_same_place():
    sc = random_scene(np.random.default_rng(2), [4, 7])
    a, b = render(sc, 32), render(sc, 64)
    for i in range(2):
        for k in range(sc.counts[i]):
            ca = np.argwhere(a.masks[i, k]).mean(0) + 0.5
            cb = np.argwhere(b.masks[i, k]).mean(0) + 0.5
            assert np.abs(ca / 32 - cb / 64).max() < 1.5 / 32


def test_bad_scenes_raise_clear_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="0 to 10"):
        sample_positions(rng, MAX_OBJECTS + 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_positions([[0.5, 1.2]])
    with pytest.raises(ValueError, match="minimum separation"):
        check_positions([[0.5, 0.5], [0.55, 0.5]])
    with pytest.raises(ValueError, match="maximum"):
        check_positions(np.linspace(0.05, 0.95, 22).reshape(11, 2))
    with pytest.raises(ValueError, match="at least 8"):
        render(random_scene(rng, [1]), size=4)
    with pytest.raises(ValueError, match="positions"):
        random_scene(rng, [2], positions=[np.array([[0.3, 0.3]])])
