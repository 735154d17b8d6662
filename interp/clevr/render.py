"""A procedural CLEVR-like renderer in vectorised numpy (no Blender, no ray tracing).

CLEVR scenes are a grey floor seen from above at a slant, lit by soft lights, with a few spheres, cubes
and cylinders in 8 colours and 2 sizes. What the science needs from them (SCIENCE.md §1) is not realism but
*disjoint object regions with exact ground truth*: conditional projective composition is a statement about
pixel regions ``M_j`` that belong to one conditioner each. So this renderer draws every object from a signed
distance field (antialiased edges, simple Lambert + highlight shading, a soft offset shadow) and returns, per
scene, the object masks together with the exact positions, shapes, colours and sizes that made them.

Everything is computed for a whole batch of scenes at once on a ``(B, K, H, W)`` grid (``K`` = the largest
object count in the batch), which is what makes thousands of scenes per second possible on one core.

Coordinates: normalised ``(x, y) ∈ [0, 1]²`` with x to the right and y *down* (image convention); pixel
``(row, col)`` has its centre at ``((col + 0.5) / W, (row + 0.5) / H)``. Sizes are normalised too, so a
scene renders identically (up to resolution) at 32×32 and 64×64.

Placement *(ours)*: object centres keep ``MARGIN`` from the border and at least ``MIN_SEPARATION`` from
each other, chosen so that two large objects never touch (``MIN_SEPARATION > 2·RADIUS["large"]``); hence the
object masks are disjoint by construction and up to ``MAX_OBJECTS = 10`` objects always fit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: CLEVR's eight colours (RGB in [0, 1]), in CLEVR's own order.
COLOURS: dict[str, tuple[float, float, float]] = {
    "gray": (87 / 255, 87 / 255, 87 / 255),
    "red": (173 / 255, 35 / 255, 35 / 255),
    "blue": (42 / 255, 75 / 255, 215 / 255),
    "green": (29 / 255, 105 / 255, 20 / 255),
    "brown": (129 / 255, 74 / 255, 25 / 255),
    "purple": (129 / 255, 38 / 255, 192 / 255),
    "cyan": (41 / 255, 208 / 255, 208 / 255),
    "yellow": (255 / 255, 238 / 255, 51 / 255),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder")
SIZES: tuple[str, ...] = ("small", "large")
#: Object "radius" (half extent) in normalised units: 2.0 px / 3.2 px at 32×32.
RADIUS: dict[str, float] = {"small": 2.0 / 32, "large": 3.2 / 32}
#: Minimum centre-to-centre distance (normalised); 7 px at 32×32, > 2 · large radius, so masks are disjoint.
MIN_SEPARATION: float = 0.22
#: Centres keep this distance from the image border (normalised).
MARGIN: float = 0.1
MAX_OBJECTS: int = 10

_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (8, 3)
_LIGHT = np.array([-0.45, -0.55, 0.70], dtype=np.float32)
_LIGHT /= np.linalg.norm(_LIGHT)
_HALF = _LIGHT + np.array([0.0, 0.0, 1.0], dtype=np.float32)
_HALF /= np.linalg.norm(_HALF)


@dataclass(frozen=True)
class Scene:
    """Ground truth of a batch of scenes, padded to ``K`` objects.

    Attributes:
        positions: ``(B, K, 2)`` float32 normalised ``(x, y)`` object centres (0 where padded).
        valid: ``(B, K)`` bool, True for real objects.
        shapes: ``(B, K)`` int64 index into :data:`SHAPES`.
        colours: ``(B, K)`` int64 index into :data:`COLOUR_NAMES`.
        sizes: ``(B, K)`` int64 index into :data:`SIZES`.
        angles: ``(B, K)`` float32 rotation of cubes (radians).
    """

    positions: np.ndarray
    valid: np.ndarray
    shapes: np.ndarray
    colours: np.ndarray
    sizes: np.ndarray
    angles: np.ndarray

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def counts(self) -> np.ndarray:
        """``(B,)`` number of objects per scene."""
        return self.valid.sum(1)

    def pixel_positions(self, size: int) -> np.ndarray:
        """``(B, K, 2)`` object centres in pixel units ``(x·W, y·H)`` (pixel centres sit at ``i + 0.5``)."""
        return self.positions * size


@dataclass(frozen=True)
class Rendered:
    """Images plus their exact ground truth.

    Attributes:
        images: ``(B, 3, H, W)`` float32 in [0, 1].
        masks: ``(B, K, H, W)`` bool, pixels whose coverage by object ``k`` is at least one half; disjoint.
        coverage: ``(B, K, H, W)`` float32 antialiased coverage in [0, 1].
        scene: the :class:`Scene` that was drawn.
    """

    images: np.ndarray
    masks: np.ndarray
    coverage: np.ndarray
    scene: Scene

    def to_model_range(self) -> np.ndarray:
        """Images in the diffusion models' range [-1, 1], ``(B, 3, H, W)``."""
        return self.images * 2.0 - 1.0


# --------------------------------------------------------------------------- placement
def sample_positions(
    rng: np.random.Generator,
    k: int,
    *,
    min_separation: float = MIN_SEPARATION,
    margin: float = MARGIN,
    max_tries: int = 200,
) -> np.ndarray:
    """``k`` random centres ``(k, 2)`` keeping ``margin`` from the border and ``min_separation`` apart.

    Random sequential placement with restarts; deterministic given ``rng``.
    """
    if not 0 <= k <= MAX_OBJECTS:
        raise ValueError(f"k={k} objects requested; the renderer supports 0 to {MAX_OBJECTS}")
    lo, hi = margin, 1.0 - margin
    sep2 = min_separation * min_separation
    for _ in range(max_tries):
        pts = np.empty((k, 2), dtype=np.float64)
        n = 0
        while n < k:
            cand = rng.uniform(lo, hi, size=(64, 2))
            if n:
                # the first of 64 candidates far enough from every placed centre (squared distances: no sqrt)
                diff = cand[:, None, :] - pts[None, :n, :]
                ok = (diff * diff).sum(-1).min(1) >= sep2
                first = int(ok.argmax())
                if not ok[first]:
                    break
                pts[n] = cand[first]
            else:
                pts[n] = cand[0]
            n += 1
        if n == k:
            return pts.astype(np.float32)
    raise RuntimeError(f"could not place {k} objects {min_separation} apart in {max_tries} tries")


def check_positions(positions: np.ndarray | Sequence[Sequence[float]], *, min_separation: float = MIN_SEPARATION) -> np.ndarray:
    """Validate user-given centres ``(k, 2)``: in [0, 1], at most :data:`MAX_OBJECTS`, not overlapping."""
    pos = np.asarray(positions, dtype=np.float32)
    if pos.size == 0:
        return pos.reshape(0, 2)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"positions must be (k, 2) normalised (x, y) pairs, got shape {pos.shape}")
    if not np.isfinite(pos).all():
        raise ValueError("positions contain NaN or Inf")
    if (pos < 0).any() or (pos > 1).any():
        raise ValueError(f"positions must lie in [0, 1] (normalised image coordinates), got {pos[((pos < 0) | (pos > 1)).any(1)].tolist()}")
    if pos.shape[0] > MAX_OBJECTS:
        raise ValueError(f"{pos.shape[0]} objects requested, more than the maximum of {MAX_OBJECTS}")
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(len(pos)) * 9
    if (d < min_separation - 1e-6).any():
        i, j = np.unravel_index(np.argmin(d), d.shape)
        raise ValueError(
            f"objects {i} and {j} are {d[i, j]:.3f} apart, closer than the minimum separation {min_separation}: "
            "their regions would overlap; move them apart or use fewer objects"
        )
    return pos


def random_scene(
    rng: np.random.Generator,
    counts: Sequence[int] | np.ndarray,
    *,
    positions: Sequence[np.ndarray] | None = None,
    colours: Sequence[Sequence[int]] | None = None,
) -> Scene:
    """Random attributes for scenes with the given object ``counts`` (optionally fixed positions/colours)."""
    counts = np.asarray(counts, dtype=np.int64)
    B = len(counts)
    K = int(counts.max()) if B else 0
    pos = np.zeros((B, K, 2), np.float32)
    valid = np.arange(K)[None, :] < counts[:, None]
    for b, k in enumerate(counts):
        if positions is not None:
            p = check_positions(positions[b])
            if len(p) != k:
                raise ValueError(f"scene {b}: {len(p)} positions for {k} objects")
        else:
            p = sample_positions(rng, int(k))
        pos[b, :k] = p
    shapes = rng.integers(0, len(SHAPES), size=(B, K))
    cols = rng.integers(0, len(COLOUR_NAMES), size=(B, K))
    if colours is not None:
        for b, c in enumerate(colours):
            c = np.asarray(c, dtype=np.int64)
            if len(c) != counts[b] or ((c < 0) | (c >= len(COLOUR_NAMES))).any():
                raise ValueError(f"scene {b}: colours must be {counts[b]} indices in [0, {len(COLOUR_NAMES)})")
            cols[b, : len(c)] = c
    sizes = rng.integers(0, len(SIZES), size=(B, K))
    angles = rng.uniform(0, np.pi / 2, size=(B, K)).astype(np.float32)
    z = np.zeros_like
    return Scene(
        positions=pos,
        valid=valid,
        shapes=np.where(valid, shapes, 0),
        colours=np.where(valid, cols, 0),
        sizes=np.where(valid, sizes, 0),
        angles=np.where(valid, angles, z(angles)),
    )


# --------------------------------------------------------------------------- drawing
def floor(size: int) -> np.ndarray:
    """The empty floor ``(3, H, W)`` in [0, 1]: grey, brightest under a soft light at the upper left."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = c[None, :], c[:, None]
    light = np.exp(-((x - 0.35) ** 2 + (y - 0.3) ** 2) / 0.35)
    g = 0.47 + 0.16 * light + 0.03 * (1 - y)
    return np.repeat(g[None], 3, axis=0).astype(np.float32)


def _smooth(sdf_px: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Antialiased coverage from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sdf_px / width, 0.0, 1.0)


def _draw(
    scene: Scene, px: np.ndarray, py: np.ndarray, size: int, only_shape: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-object coverage ``(B, K, h, w)``, shaded colour ``(B, K, 3, h, w)`` and shadow ``(B, K, h, w)``.

    ``px`` / ``py`` are normalised pixel-centre coordinates broadcastable to ``(B, K, 1, w)`` / ``(B, K, h, 1)``:
    the whole image (dense reference) or a window around each object (the fast path). ``only_shape``: every
    object is of this shape index (the fast path groups objects by shape), so only its geometry is evaluated;
    the values are the same, element for element, as when all shapes are evaluated and one is selected.
    """
    cx = scene.positions[..., 0][..., None, None]  # (B,K,1,1)
    cy = scene.positions[..., 1][..., None, None]
    radius = np.where(scene.sizes == 1, RADIUS["large"], RADIUS["small"]).astype(np.float32)[..., None, None]
    du, dv = px - cx, py - cy  # (B,K,h,w) normalised offsets
    scale = float(size)  # normalised → pixels
    shape = scene.shapes[..., None, None]
    valid = scene.valid[..., None, None]
    needed = range(len(SHAPES)) if only_shape is None else (only_shape,)

    def pick(values: dict[int, np.ndarray]) -> np.ndarray:
        if only_shape is not None:
            return values[only_shape]
        return np.where(shape == 0, values[0], np.where(shape == 1, values[1], values[2]))

    # --- signed distances (normalised units), one per shape, selected per object
    rho = np.sqrt(du * du + dv * dv)
    ang = scene.angles[..., None, None]
    ca, sa = np.cos(ang), np.sin(ang)
    ru, rv = ca * du + sa * dv, -sa * du + ca * dv
    sds: dict[int, np.ndarray] = {}
    if 0 in needed:
        sds[0] = rho - radius
    if 1 in needed:
        sds[1] = np.maximum(np.abs(ru), np.abs(rv)) - radius * 0.82
    if 2 in needed:
        body = np.maximum(np.abs(du) - radius * 0.85, np.abs(dv) - radius * 0.55)
        ell = (np.sqrt((du / (radius * 0.85)) ** 2 + ((np.abs(dv) - radius * 0.55) / (radius * 0.35)) ** 2) - 1) * radius * 0.35
        sds[2] = np.minimum(body, ell)
    cover = _smooth(pick(sds) * scale) * valid

    # --- shading (a multiplicative factor on the base colour, plus a white highlight)
    shades: dict[int, np.ndarray] = {}
    zero = np.zeros((), np.float32)
    specs: dict[int, np.ndarray] = {1: zero, 2: zero}
    if 0 in needed:
        nz = np.sqrt(np.clip(1 - (rho / radius) ** 2, 0, 1))
        n_dot_l = (du / radius) * _LIGHT[0] + (dv / radius) * _LIGHT[1] + nz * _LIGHT[2]
        n_dot_h = (du / radius) * _HALF[0] + (dv / radius) * _HALF[1] + nz * _HALF[2]
        shades[0] = 0.30 + 0.85 * np.clip(n_dot_l, 0, 1)
        specs[0] = 0.45 * np.clip(n_dot_h, 0, 1) ** 24
    if 1 in needed:
        top = (rv < -0.15 * radius).astype(np.float32)
        shades[1] = 0.62 + 0.40 * top + 0.10 * ca - 0.12 * (ru / radius)
    if 2 in needed:
        cyl_top = (dv < -0.55 * radius).astype(np.float32)
        side = np.clip(du / (radius * 0.85), -1, 1)
        shades[2] = np.where(cyl_top > 0, 1.05, 0.45 + 0.55 * np.sqrt(np.clip(1 - side**2, 0, 1)) - 0.15 * side)
    shade = pick(shades).astype(np.float32)
    spec = np.broadcast_to(pick(specs), shade.shape).astype(np.float32)
    base = _PALETTE[scene.colours]  # (B,K,3)
    obj_rgb = np.clip(base[..., None, None] * shade[:, :, None] + spec[:, :, None], 0, 1)  # (B,K,3,h,w)

    # --- soft shadow: a blurred disc offset away from the light
    sx, sy = cx + 0.55 * radius, cy + 0.55 * radius
    sdist = np.sqrt((px - sx) ** 2 + (py - sy) ** 2) - radius * 1.05
    shadow = _smooth(sdist * scale, width=3.0) * valid
    return cover.astype(np.float32), obj_rgb.astype(np.float32), shadow.astype(np.float32)


def _composite(bg: np.ndarray, cover_sum: np.ndarray, rgb_sum: np.ndarray, shadow: np.ndarray) -> np.ndarray:
    """Floor darkened by the shadows, objects painted over it (their coverages sum to at most ~1)."""
    floor_img = bg[None] * (1 - 0.20 * shadow[:, None])
    total = np.clip(cover_sum, 0, 1)
    scale_c = np.where(cover_sum > 1, 1 / np.maximum(cover_sum, 1e-6), 1.0)
    return (floor_img * (1 - total[:, None]) + rgb_sum * scale_c[:, None]).astype(np.float32)


def _render_dense(scene: Scene, size: int = 32) -> Rendered:
    """Reference implementation: every object evaluated on the whole image (slow; used to test :func:`render`)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    cover, rgb, shadow = _draw(scene, c[None, None, None, :], c[None, None, :, None], size)
    images = _composite(floor(size), cover.sum(1), (cover[:, :, None] * rgb).sum(1), shadow.max(1))
    return Rendered(images, cover >= 0.5, cover, scene)


def _window(size: int) -> int:
    """Half-width in pixels of the window holding everything one object draws (itself and its shadow)."""
    shadow_reach = (0.55 * math.sqrt(2) + 1.05) * RADIUS["large"] * size + 1.5  # offset + radius + soft edge
    return int(math.ceil(shadow_reach + 1.0))


def render(scene: Scene, size: int = 32) -> Rendered:
    """Draw a batch of scenes at ``size × size``; see :class:`Rendered` for the outputs and their shapes.

    Each object is evaluated only in a window around it that holds everything it draws (the coverage and
    shadow are exactly zero outside), for its own shape only, and all windows are scattered into padded
    canvases at once. Equal to the dense reference up to float rounding of the sums.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    B, K = scene.valid.shape
    bg = floor(size)
    if K == 0:
        images = np.broadcast_to(bg, (B, 3, size, size)).copy()
        empty = np.zeros((B, 0, size, size))
        return Rendered(images, empty.astype(bool), empty.astype(np.float32), scene)
    h = _window(size)
    P = 2 * h + 1
    S = size + 2 * h
    # evaluate only real objects: flatten them to a batch of one-object "scenes"
    bs, ks = np.nonzero(scene.valid)
    flat = Scene(
        positions=scene.positions[bs, ks][:, None],
        valid=np.ones((len(bs), 1), bool),
        shapes=scene.shapes[bs, ks][:, None],
        colours=scene.colours[bs, ks][:, None],
        sizes=scene.sizes[bs, ks][:, None],
        angles=scene.angles[bs, ks][:, None],
    )
    centre = np.floor(flat.positions[:, 0] * size).astype(np.int64)  # (N,2) pixel (col, row) of each centre
    offs = np.arange(-h, h + 1)
    px = ((centre[:, 0, None] + offs + 0.5) / size).astype(np.float32)[:, None, None, :]
    py = ((centre[:, 1, None] + offs + 0.5) / size).astype(np.float32)[:, None, :, None]
    cover = np.empty((len(bs), 1, P, P), np.float32)
    rgb = np.empty((len(bs), 1, 3, P, P), np.float32)
    shadow = np.empty((len(bs), 1, P, P), np.float32)
    for sid in range(len(SHAPES)):  # evaluate each object's own geometry only
        idx = np.nonzero(flat.shapes[:, 0] == sid)[0]
        if idx.size:
            part = Scene(**{f.name: getattr(flat, f.name)[idx] for f in dataclasses.fields(flat)})
            cover[idx], rgb[idx], shadow[idx] = _draw(part, px[idx], py[idx], size, only_shape=sid)
    paint = cover[:, 0, None] * rgb[:, 0]  # (N,3,P,P)
    # Scatter every window into padded canvases at once. A window starts at padded index ``centre`` (its
    # centre minus h, plus the pad h). ``ufunc.at`` is unbuffered and applies the updates in index order, i.e.
    # object by object in slot order, so overlapping sums round exactly as the dense reference's sum over K.
    rows = centre[:, 1, None, None] + offs[None, :, None] + h  # (N,P,1) padded row of each window pixel
    cols = centre[:, 0, None, None] + offs[None, None, :] + h  # (N,1,P)
    flat_px = (bs[:, None, None] * S + rows) * S + cols  # (N,P,P) index into a (B,S,S) canvas
    cover_c = np.zeros(B * S * S, np.float32)
    np.add.at(cover_c, flat_px.ravel(), cover[:, 0].ravel())
    shadow_c = np.zeros(B * S * S, np.float32)
    np.maximum.at(shadow_c, flat_px.ravel(), shadow[:, 0].ravel())
    rgb_c = np.zeros((3, B * S * S), np.float32)
    for ch in range(3):
        np.add.at(rgb_c[ch], flat_px.ravel(), paint[:, ch].ravel())
    rgb_c = rgb_c.reshape(3, B, S, S).transpose(1, 0, 2, 3)
    cover_c, shadow_c = cover_c.reshape(B, S, S), shadow_c.reshape(B, S, S)
    crop = (slice(None), slice(h, h + size), slice(h, h + size))
    images = _composite(bg, cover_c[crop], rgb_c[:, :, h : h + size, h : h + size], shadow_c[crop])
    # per-object coverage: each object's window, cropped to the image, in its own (b, k) plane
    coverage = np.zeros((B * K, S, S), np.float32)
    slot = bs * K + ks
    coverage[slot[:, None, None], rows, cols] = cover[:, 0]
    coverage = np.ascontiguousarray(coverage.reshape(B, K, S, S)[:, :, h : h + size, h : h + size])
    return Rendered(images, coverage >= 0.5, coverage, scene)


def render_random(seed: int, counts: Sequence[int] | np.ndarray, size: int = 32) -> Rendered:
    """Render scenes with the given object counts; deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    return render(random_scene(rng, counts), size)
