"""Where probes evaluate a model: noise levels, forward-process samples, pixel sets, conditioner geometry.

Every probe is an expectation over inputs ``x_t`` drawn from the forward process at a noise level
(Niedoba et al.'s aggregate is ``E_{x_t}[...]``). This module turns the user's request into tensors:

* noise levels are given as **fractions** ``t ∈ [0, 1]`` of the schedule (0 clean, 1 pure noise) and
  mapped to training timesteps by :meth:`interp.Denoiser.timestep`;
* ``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε`` with one seed per sample; without data the clean image defaults to
  ``x₀ = 0`` (a mid-grey canvas) — *(ours)*: probes on a model without its dataset still see inputs
  with the right noise statistics;
* output pixels are ``"all"``, an int stride (a regular grid) or an explicit list of ``(row, col)``;
* conditioner locations are normalised ``(x, y)`` (x → columns, y → rows), compared with pixel centres
  ``((col + ½)/W, (row + ½)/H)``, so one radius means the same part of the image at every resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from interp import Conditioning, Denoiser

PixelSpec = str | int | Sequence[tuple[int, int]] | Tensor


def as_seeds(seeds: int | Sequence[int]) -> list[int]:
    """``3`` → ``[0, 1, 2]``; a list passes through (must be non-empty)."""
    out = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not out:
        raise ValueError("no seeds given: pass a positive count or a non-empty list of seeds")
    return out


def as_levels(t: float | Sequence[float]) -> list[float]:
    """Noise fractions as a list of floats in ``[0, 1]``."""
    levels = [float(t)] if isinstance(t, (int, float)) else [float(v) for v in t]
    if not levels:
        raise ValueError("no noise levels given")
    bad = [v for v in levels if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"noise levels are fractions of the schedule in [0, 1]; got {bad}")
    return levels


def log_levels(n: int = 10, lo: float = 0.02, hi: float = 0.98) -> list[float]:
    """``n`` noise fractions log-spaced in ``[lo, hi]`` (SCIENCE.md §3.5 asks for 8–12 per sweep)."""
    import math

    if n < 1 or not 0 < lo <= hi <= 1:
        raise ValueError(f"need n >= 1 and 0 < lo <= hi <= 1, got n={n}, lo={lo}, hi={hi}")
    if n == 1:
        return [hi]
    return [round(math.exp(math.log(lo) + i * (math.log(hi) - math.log(lo)) / (n - 1)), 6) for i in range(n)]


def resolve_timestep(den: Denoiser, *, t: float | None = None, timestep: Tensor | float | int | None = None) -> Tensor:
    """The training timestep of a call that takes either a noise fraction ``t`` or a raw ``timestep``.

    Verbs that accept an explicit input ``x_t`` also need its noise level: as ``t`` (a noise fraction in
    ``[0, 1]``, the same unit as every probe's ``t``) or, at the low level, as ``timestep`` (the scheduler's
    training timestep, ``0 … num_train_timesteps − 1``). Exactly one must be given.

    Returns:
        a 0-d tensor on the model's device (long for ``t``; ``timestep`` as given, checked by the Denoiser).
    """
    if (t is None) == (timestep is None):
        raise ValueError(
            "pass exactly one of t= (noise fraction in [0, 1]) or timestep= (training timestep, "
            f"0..{den.max_timestep}); got t={t!r}, timestep={timestep!r}"
        )
    if t is not None:
        if isinstance(t, Tensor) or not isinstance(t, (int, float)):
            raise TypeError(f"t must be one noise fraction (a float in [0, 1]), got {type(t).__name__}; "
                            "loop over noise levels, or pass timestep= for a raw scheduler timestep")
        return den.timestep(as_levels(t)[0]).to(den.device)
    ts = torch.as_tensor(timestep)
    if ts.dim() > 0 and ts.numel() != 1:
        raise ValueError(f"timestep must be one value, got shape {tuple(ts.shape)}")
    return ts.reshape(()).to(den.device)


def input_shape(den: Denoiser, shape: Sequence[int] | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the model's input: ``shape`` if given, else from the network config."""
    if shape is not None:
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
        return tuple(int(s) for s in shape)  # type: ignore[return-value]
    c = den.in_channels
    size = den.config.get("sample_size")
    if c is None or size is None:
        raise ValueError(f"{den.name} has no in_channels / sample_size in its config: pass shape=(C, H, W)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(c), int(h), int(w))


def forward_samples(
    den: Denoiser,
    t: float,
    seeds: Sequence[int],
    *,
    x0: Tensor | None = None,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Forward-process samples at noise fraction ``t``, one per seed.

    Args:
        den: the denoiser (its schedule and device are used).
        t: noise fraction in ``[0, 1]``.
        seeds: one seed per sample (the noise ε of sample ``s`` is drawn from ``torch.Generator().manual_seed(s)``).
        x0: clean images ``(C, H, W)`` or ``(S, C, H, W)`` (``S`` = 1 or ``len(seeds)``); default zeros.
        shape: ``(C, H, W)`` when the network config does not say it.
        dtype: dtype of the returned ``x_t`` (the Denoiser casts to the model's own dtype).

    Returns:
        ``x_t (S, C, H, W)`` on the model's device and the training timestep (0-d long tensor).
    """
    if x0 is not None:
        x0 = x0 if x0.dim() == 4 else x0.unsqueeze(0)
        c, h, w = x0.shape[1:]
    else:
        c, h, w = input_shape(den, shape)
    timestep = den.timestep(t)
    noise = torch.stack(
        [torch.randn((c, h, w), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    )
    if x0 is None:
        clean = torch.zeros_like(noise)
    else:
        if x0.shape[0] not in (1, len(seeds)):
            raise ValueError(f"x0 holds {x0.shape[0]} images for {len(seeds)} seeds; pass 1 or {len(seeds)}")
        clean = x0.detach().to("cpu", torch.float64).expand_as(noise)
    x_t = den.add_noise(clean, noise, timestep.double())
    return x_t.to(device=den.device, dtype=dtype), timestep.to(den.device)


def noisy_inputs(
    den: Denoiser,
    t: float | Sequence[float] | None,
    seeds: int | Sequence[int],
    *,
    x_t: Tensor | None = None,
    timestep: Tensor | float | int | None = None,
    x0: Tensor | None = None,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[float, Tensor, Tensor]]:
    """The inputs a probe averages over: ``[(t, x_t (S, C, H, W), timestep), ...]``, one entry per noise level.

    By default ``x_t`` is drawn from the forward process at each noise fraction in ``t``, one sample per seed
    (:func:`forward_samples`). With an explicit ``x_t`` (a reverse trajectory's state, real data noised by the
    user) its noise level is ``t`` (one fraction) or ``timestep`` (the raw training timestep); ``seeds`` and
    ``x0`` are then unused and refused if given alongside.
    """
    if x_t is None:
        if timestep is not None:
            raise ValueError("timestep= describes an explicit x_t; without x_t pass noise fractions as t=")
        levels = as_levels(t) if t is not None else None
        if levels is None:
            raise ValueError("pass t= (noise fraction(s) in [0, 1]) or an explicit x_t= with its t= or timestep=")
        seed_list = as_seeds(seeds)
        return [(level, *forward_samples(den, level, seed_list, x0=x0, shape=shape, dtype=dtype)) for level in levels]
    if not isinstance(x_t, Tensor) or x_t.dim() != 4:
        raise ValueError(f"x_t must be a (S, C, H, W) tensor, got {getattr(x_t, 'shape', type(x_t).__name__)}")
    if x0 is not None:
        raise ValueError("x0= builds forward-process inputs; it cannot be combined with an explicit x_t=")
    if t is not None and not isinstance(t, (int, float)):
        raise ValueError(f"an explicit x_t has one noise level: pass one fraction t=, got {t!r}")
    ts = resolve_timestep(den, t=t, timestep=timestep)
    level = float(t) if t is not None else round(float(den.fraction(ts)), 6)
    return [(level, x_t.to(den.device), ts)]


def pixel_list(spec: PixelSpec, hw: tuple[int, int]) -> Tensor:
    """Resolve a pixel request to a ``(P, 2)`` long tensor of ``(row, col)``.

    ``"all"`` → every pixel (row-major); an int ``s`` → the grid of every ``s``-th pixel starting at
    ``s // 2``; ``"center"`` → the central pixel; a list / tensor of ``(row, col)`` passes through (checked).
    """
    H, W = hw
    if isinstance(spec, str):
        if spec == "all":
            rr, cc = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
            return torch.stack([rr.flatten(), cc.flatten()], 1)
        if spec == "center":
            return torch.tensor([[H // 2, W // 2]])
        raise ValueError(f"pixels must be 'all', 'center', a grid stride (int) or a list of (row, col); got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"grid stride must be >= 1, got {spec}")
        rr, cc = torch.meshgrid(torch.arange(spec // 2, H, spec), torch.arange(spec // 2, W, spec), indexing="ij")
        return torch.stack([rr.flatten(), cc.flatten()], 1)
    raw = torch.as_tensor(spec)
    if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
        if raw.is_floating_point() and torch.equal(raw, raw.round()):
            raw = raw.long()  # (16.0, 16.0) is pixel (16, 16); 16.5 is refused below
        else:
            raise ValueError(f"pixels must be integer (row, col) indices, got {raw.flatten()[:8].tolist()}; "
                             "round them, or pass a grid stride / 'all' / 'center'")
    if raw.numel() % 2:
        raise ValueError(f"pixels must be (row, col) pairs, got {raw.numel()} numbers")
    px = raw.to(torch.long).reshape(-1, 2)
    if px.numel() == 0:
        raise ValueError("empty pixel list")
    if (px[:, 0] < 0).any() or (px[:, 0] >= H).any() or (px[:, 1] < 0).any() or (px[:, 1] >= W).any():
        raise ValueError(f"pixels must lie in the {H}x{W} output; got {px.tolist()[:8]}")
    return px


def pixel_centres(hw: tuple[int, int], device: Any = None) -> tuple[Tensor, Tensor]:
    """Normalised ``(x, y)`` coordinates of pixel centres, each ``(H, W)`` float64."""
    H, W = hw
    y = (torch.arange(H, dtype=torch.float64, device=device) + 0.5) / H
    x = (torch.arange(W, dtype=torch.float64, device=device) + 0.5) / W
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return xx, yy


def check_locations(locations: Tensor | Sequence[Sequence[float]], name: str = "cond.locations") -> Tensor:
    """``(k, 2)`` float64 conditioner locations, refused unless finite and inside the image ``[0, 1]²``.

    A NaN or out-of-image location would otherwise turn every region summary into 0 or 1 without a word.
    """
    loc = torch.as_tensor(locations).detach().to("cpu", torch.float64)
    if loc.numel() % 2 or (loc.dim() == 2 and loc.shape[-1] != 2):
        raise ValueError(f"{name} must be (k, 2) normalised (x, y) pairs, got shape {tuple(loc.shape)}")
    loc = loc.reshape(-1, 2)
    if not torch.isfinite(loc).all():
        raise ValueError(f"{name} contains NaN or Inf: {loc.tolist()[:8]}; every conditioner needs a location in [0, 1]")
    if ((loc < 0) | (loc > 1)).any():
        raise ValueError(f"{name} must lie in [0, 1] (normalised x → columns, y → rows), got {loc.tolist()[:8]}")
    return loc


def conditioner_distances(locations: Tensor, hw: tuple[int, int]) -> Tensor:
    """``(k, H, W)`` Euclidean distance (normalised units) from each pixel centre to each location ``(k, 2)``."""
    xx, yy = pixel_centres(hw)
    loc = check_locations(locations)
    return ((xx[None] - loc[:, 0, None, None]) ** 2 + (yy[None] - loc[:, 1, None, None]) ** 2).sqrt()


def check_conditioning(cond: Conditioning, *, need_locations: bool = False, max_k: int | None = None) -> None:
    """Clear errors for conditionings a conditioner-level probe cannot use."""
    if not isinstance(cond, Conditioning):
        raise TypeError(f"expected an interp.Conditioning, got {type(cond).__name__}")
    if cond.k == 0:
        raise ValueError("the conditioning holds no conditioner: conditional probes need at least one (k >= 1)")
    if max_k is not None and cond.k > max_k:
        raise ValueError(f"{cond.k} conditioners exceed this probe's limit of {max_k}; pass a subset (cond.subset(js))")
    if need_locations and cond.locations is None:
        raise ValueError(
            "this summary needs conditioner locations (cond.locations); pass a CLEVR conditioning, "
            "or set radius=None to skip the location-based summaries"
        )
