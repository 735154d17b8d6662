"""Input checks shared by the nouns: every message names the problem and the fix."""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor


def is_traced(t: Tensor) -> bool:
    """True for tensors wrapped by ``torch.func`` transforms (vmap / jvp / grad), where ``bool(t)`` is illegal."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - older torch
        return False


def check_finite(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or Inf (skipped inside ``torch.func`` transforms)."""
    if is_traced(t):
        return
    if not torch.isfinite(t).all():
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} Inf values (shape {tuple(t.shape)}); "
            "check the step that produced it (a diverged sampler, an fp16 overflow, a bad cast)"
        )


def parse_bytes(value: int | float | str | None, name: str = "budget") -> int | None:
    """``"2GiB"``, ``"500MB"``, ``1e9`` -> a positive number of bytes (``None`` passes through).

    Raises:
        ValueError: naming ``name``, for zero, negative, non-finite or unparsable sizes.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number of bytes or a size such as '2GiB', got {value!r}")
    if isinstance(value, str):
        s = value.strip().replace(" ", "")
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
                 "TB": 10**12, "B": 1}
        mult, number = 1, s
        for unit, m in units.items():
            if s.upper().endswith(unit):
                mult, number = m, s[: -len(unit)]
                break
        try:
            amount = float(number) * mult
        except ValueError:
            raise ValueError(f"{name}={value!r} is not a size; use bytes or a size such as '512MiB' or '2GB'") from None
    else:
        amount = float(value)
    if not math.isfinite(amount) or amount < 1:
        raise ValueError(f"{name}={value!r} must be a positive size (at least 1 byte); use e.g. '512MiB'")
    return int(amount)


def format_bytes(n: float) -> str:
    """Human-readable binary size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (bools and non-integral numbers refused), at least ``minimum`` if given."""
    # bool is an int subclass: ``num_steps=True`` is a bug, not "1 step".
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        out = operator.index(value)  # int, numpy / 0-d torch integers; refuses 2.0 and 2.5 alike
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def check_guidance_scale(scale: float | Tensor | None, name: str = "guidance_scale") -> float | Tensor | None:
    """Check a classifier-free guidance scale and return it unchanged.

    ``None`` means no guidance; otherwise a finite number >= 0 (1 = conditional only, 0 = unconditional).
    A one-element tensor is allowed (and passed through, so it stays differentiable); its value is not
    checked inside ``torch.func`` transforms.
    """
    if scale is None:
        return None
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or scale.dtype == torch.bool or scale.is_complex():
            raise TypeError(f"{name} must be one real number, got a {scale.dtype} tensor of shape {tuple(scale.shape)}")
        if is_traced(scale):
            return scale
        value = float(scale.detach().item())
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a number (or None for no guidance), got {type(scale).__name__}")
    else:
        value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (1 = no guidance, 0 = unconditional), got {value}")
    return scale


def check_locations(name: str, locations: Tensor, mask: Tensor | None = None) -> None:
    """Raise ``ValueError`` unless ``locations (..., 2)`` are finite normalised ``(x, y)`` in ``[0, 1]``.

    ``mask`` (``locations.shape[:-1]``, bool) selects the real entries of a padded batch; padded slots may
    hold anything. Value checks are skipped inside ``torch.func`` transforms (shapes are still checked).
    """
    if not isinstance(locations, Tensor):
        raise TypeError(f"{name} must be a tensor of (x, y) pairs, got {type(locations).__name__}")
    if locations.dim() < 1 or locations.shape[-1] != 2:
        raise ValueError(f"{name} must hold normalised (x, y) pairs in its last dimension, got shape {tuple(locations.shape)}")
    if not locations.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {locations.dtype}; use {name}.float()")
    if is_traced(locations) or locations.device.type == "meta":
        return
    values = locations if mask is None else locations[mask]
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} contain NaN or Inf: {values[~torch.isfinite(values).all(-1)].tolist()[:8]}")
    outside = ((values < 0) | (values > 1)).any(-1)
    if outside.any():
        raise ValueError(
            f"{name} must lie in [0, 1] (normalised image coordinates, x right, y down); "
            f"out of range: {values[outside].tolist()[:8]}"
        )


def check_timesteps(
    timestep: object, num_train_timesteps: int, name: str = "timestep", *, last: int | None = None
) -> None:
    """Raise unless ``timestep`` (scalar, sequence or tensor) holds training timesteps of the schedule.

    Valid values lie in ``[0, last]`` (default ``num_train_timesteps - 1``; flow schedules reach
    ``num_train_timesteps``) and are finite. Non-integer values >= 1 are allowed
    (Euler-type schedulers call the network at interpolated timesteps), but a non-integer in ``(0, 1)`` is
    almost always a noise *fraction* passed where a timestep belongs, and is refused with the fix.

    The check reads plain values: a tensor wrapped by a ``torch.func`` transform (where ``bool(t)`` is
    illegal) is not checked — pass timesteps from outside the transform, as every verb does.
    """
    if isinstance(timestep, bool):
        raise TypeError(f"{name} must be a number or tensor of training timesteps, got the bool {timestep!r}")
    if isinstance(timestep, Tensor):
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise TypeError(f"{name} must hold real training timesteps, got a {timestep.dtype} tensor")
        if is_traced(timestep) or timestep.device.type == "meta":
            return
        values = timestep.detach().to("cpu", torch.float64).flatten()
    elif isinstance(timestep, numbers.Real):
        values = torch.tensor([float(timestep)], dtype=torch.float64)
    else:
        try:
            values = torch.as_tensor(timestep, dtype=torch.float64).flatten()  # lists, numpy arrays
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{name} must be a number, sequence or tensor of training timesteps, got {type(timestep).__name__}"
            ) from None
    if values.numel() == 0:
        raise ValueError(f"{name} is empty: pass one training timestep, or one per sample")
    last = num_train_timesteps - 1 if last is None else last
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or Inf: {values[:8].tolist()}; training timesteps lie in [0, {last}]")
    outside = (values < 0) | (values > last)
    if outside.any():
        raise ValueError(
            f"{name} must lie in [0, {last}] (the schedule's training timesteps), got {values[outside][:8].tolist()}; "
            "for a noise fraction t in [0, 1] pass den.timestep(t)"
        )
    fraction = (values > 0) & (values < 1)
    if fraction.any():
        v = values[fraction][0].item()
        raise ValueError(
            f"{name} {v:g} looks like a noise fraction; pass den.timestep({v:g}) for the training timestep "
            f"at that fraction (training timesteps are 0..{last})"
        )
