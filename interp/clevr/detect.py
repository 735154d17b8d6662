"""Detect and count objects in (generated) CLEVR-like scenes — no learning, so nothing to overfit.

Method *(ours)*, per image:

1. **Background ratio.** The floor of every scene is the renderer's fixed floor (:func:`render.floor`); a
   generated floor may drift in brightness, so we divide the image by the floor times a per-image,
   per-channel gain (the median ratio: objects cover far less than half of any scene). On the floor the
   ratio ``q`` is 1 in every channel; in a shadow it is a *common* factor in [0.8, 1].
2. **Smoothing before any nonlinearity.** The image is blurred per channel with a Gaussian of width
   ``sigma`` (≈ half an object radius) before the ratio, which averages sampling noise away instead of
   rectifying it and turns each object into one broad bump near its centre.
3. **Shadow-blind objectness.** ``s = ‖q − mean_c q‖ + w·relu(shadow_floor − mean_c q) + relu(mean_c q −
   highlight_floor)``: colour (chroma) anywhere, plus darkness beyond what a shadow can do (CLEVR's gray
   objects), plus brightness beyond the floor (highlights, yellow).
4. **Peaks.** Objects are local maxima of ``s`` within a window of radius ``nms_radius`` (< half the minimum
   separation, so two objects never suppress each other) with ``s > threshold``. Shadows are darker floor:
   their blurred residual stays below the threshold, which was set on rendered validation scenes (seeds
   disjoint from the tests) with Gaussian noise and blur of the size generated samples show.
5. **Position.** The objectness-weighted centroid in a small window around the peak.

All lengths are given in normalised image units and scale with the resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from interp.clevr.render import floor


@dataclass(frozen=True)
class DetectorConfig:
    """Detector parameters (normalised units; defaults validated on rendered scenes, see module docstring).

    Attributes:
        sigma: Gaussian blur of the residual (normalised; 1.3 px at 32×32).
        nms_radius: peaks closer than this to a stronger peak are suppressed (normalised; 3 px at 32×32).
        threshold: minimum objectness of a peak (RGB in [0, 1] units).
        centroid_radius: window for the sub-pixel centroid (normalised).
    """

    sigma: float = 1.0 / 32
    nms_radius: float = 2.5 / 32
    threshold: float = 0.08
    centroid_radius: float = 2.0 / 32
    shadow_floor: float = 0.85
    dark_weight: float = 2.0
    highlight_floor: float = 1.05
    bright_weight: float = 0.3
    noise_factor: float = 3.0
    peak_sigma: float = 0.0
    merge_distance: float = 5.0 / 32
    merge_ratio: float = 0.7


@dataclass(frozen=True)
class Detections:
    """Detected objects of a batch.

    Attributes:
        positions: list of ``(n_b, 2)`` float32 arrays of normalised ``(x, y)`` centres, one per image.
        scores: list of ``(n_b,)`` objectness values.
        objectness: ``(B, H, W)`` the map the peaks were taken from.
    """

    positions: list[np.ndarray]
    scores: list[np.ndarray]
    objectness: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """``(B,)`` number of objects found per image."""
        return np.array([len(p) for p in self.positions], dtype=np.int64)


def _gaussian_kernel(sigma_px: float) -> Tensor:
    r = max(1, int(np.ceil(3 * sigma_px)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma_px**2))
    return k / k.sum()


def _blur(x: Tensor, sigma_px: float) -> Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with replicate padding."""
    k = _gaussian_kernel(sigma_px)
    r = k.numel() // 2
    C = x.shape[1]
    x = F.pad(x, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)


def objectness(images: Tensor | np.ndarray, config: DetectorConfig = DetectorConfig(), *, value_range: str = "01") -> Tensor:
    """``(B, 3, H, W)`` images → ``(B, H, W)`` objectness map (see the module docstring).

    Args:
        value_range: ``"01"`` for images in [0, 1], ``"-11"`` for the models' [-1, 1].
    """
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images).float().cpu()
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise ValueError(f"images must be (B, 3, H, H), got {tuple(x.shape)}")
    if value_range == "-11":
        x = (x + 1) / 2
    elif value_range != "01":
        raise ValueError(f"value_range must be '01' or '-11', got {value_range!r}")
    size = x.shape[-1]
    fl = torch.from_numpy(floor(size))[None]
    # per-image, per-channel gain of the floor (a generated floor may be a little brighter or darker)
    gain = (x / fl).flatten(2).median(-1).values[..., None, None]
    q = _blur(x, config.sigma * size) / (fl * gain)  # 1 on the floor, a common factor < 1 in a shadow
    m = q.mean(1)
    chroma = (q - m[:, None]).norm(dim=1)
    dark = (config.shadow_floor - m).clamp(min=0)
    bright = (m - config.highlight_floor).clamp(min=0)
    return chroma + config.dark_weight * dark + config.bright_weight * bright


def noise_level(images: Tensor | np.ndarray, *, value_range: str = "01") -> Tensor:
    """``(B,)`` robust per-image pixel-noise estimate: MAD of the high-pass residual ``x − blur(x)``."""
    x = torch.as_tensor(images).float().cpu()
    if value_range == "-11":
        x = (x + 1) / 2
    hp = (x - _blur(x, 1.0)).flatten(1)
    mad = (hp - hp.median(1, keepdim=True).values).abs().median(1).values
    return 1.4826 * mad


def _same_object(s: Tensor, p: tuple[int, int], q: tuple[int, int], config: DetectorConfig, size: int) -> bool:
    """True when the weaker peak ``p`` is joined to ``q`` by a ridge: along the segment the objectness never
    drops below ``merge_ratio`` of ``p``'s value (two objects are always separated by a floor gap)."""
    d2 = (p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2
    if d2 > (config.merge_distance * size) ** 2:
        return False
    t = torch.linspace(0, 1, 9)
    rows = torch.round(p[0] + t * (q[0] - p[0])).long()
    cols = torch.round(p[1] + t * (q[1] - p[1])).long()
    return bool(s[rows, cols].min() >= config.merge_ratio * s[p[0], p[1]])


def detect(images: Tensor | np.ndarray, config: DetectorConfig = DetectorConfig(), *, value_range: str = "01") -> Detections:
    """Find objects in ``(B, 3, H, W)`` images; returns :class:`Detections`."""
    s = objectness(images, config, value_range=value_range)
    B, H, W = s.shape
    if config.peak_sigma > 0:
        # one object can light up in two places (highlight and shaded side): merge them before the peaks
        s = _blur(s[:, None], config.peak_sigma * W)[:, 0]
    r_nms = config.nms_radius * W
    r = max(1, int(r_nms))
    pooled = F.max_pool2d(s[:, None], 2 * r + 1, stride=1, padding=r)[:, 0]
    # noisy images get a proportionally higher threshold: the norm in the objectness rectifies noise
    thr = config.threshold + config.noise_factor * noise_level(images, value_range=value_range)
    peaks = (s >= pooled) & (s > thr[:, None, None])
    cr = max(1, int(round(config.centroid_radius * W)))
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    positions, scores = [], []
    for b in range(B):
        rows, cols = torch.nonzero(peaks[b], as_tuple=True)
        # plateaus give several equal maxima: keep the strongest first, drop any within r of a kept one
        order = torch.argsort(s[b, rows, cols], descending=True)
        kept: list[tuple[int, int]] = []
        for i in order.tolist():
            rr, cc = int(rows[i]), int(cols[i])
            if all((rr - a) ** 2 + (cc - c) ** 2 > r_nms**2 and not _same_object(s[b], (rr, cc), (a, c), config, W) for a, c in kept):
                kept.append((rr, cc))
        pos, sc = [], []
        for rr, cc in kept:
            r0, r1, c0, c1 = max(0, rr - cr), min(H, rr + cr + 1), max(0, cc - cr), min(W, cc + cr + 1)
            w = s[b, r0:r1, c0:c1]
            tot = w.sum()
            cy = float((w * yy[r0:r1, c0:c1]).sum() / tot)
            cx = float((w * xx[r0:r1, c0:c1]).sum() / tot)
            pos.append(((cx + 0.5) / W, (cy + 0.5) / H))
            sc.append(float(s[b, rr, cc]))
        positions.append(np.asarray(pos, dtype=np.float32).reshape(-1, 2))
        scores.append(np.asarray(sc, dtype=np.float32))
    return Detections(positions, scores, s.numpy())


def degrade(images: np.ndarray, seed: int, *, noise: float = 0.05, blur: float = 0.6, value_range: str = "01") -> np.ndarray:
    """Gaussian blur (``blur`` px at 32×32, scaled with size) plus Gaussian noise (std ``noise``): the kind of
    imperfection generated samples show. Used to validate the detector; returns images in the same range."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    size = x.shape[-1]
    if blur > 0:
        x = _blur(x, blur * size / 32)
    g = torch.Generator().manual_seed(seed)
    x = x + noise * torch.randn(x.shape, generator=g) * (2 if value_range == "-11" else 1)
    return x.numpy()
