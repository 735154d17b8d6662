"""Input checks shared by the nouns: every message names the problem and the fix."""

from __future__ import annotations

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


def parse_bytes(value: int | float | str | None) -> int | None:
    """``"2GiB"``, ``"500MB"``, ``1e9`` -> bytes (``None`` passes through)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    s = value.strip().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.upper().endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(float(s))


def format_bytes(n: float) -> str:
    """Human-readable binary size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
