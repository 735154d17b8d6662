"""Noise schedules as (α_t, σ_t): how much signal and how much noise the network's input holds.

Every diffusion model the toolkit wraps sees ``x_t = α_t x₀ + σ_t ε`` at a training ``timestep``; the schedule
says what α and σ are there. Two families exist in diffusers:

* **variance preserving** (``"vp"``; DDPM, DDIM, Euler, ... — SD1.5/2, SDXL, PixArt, DiT, the CLEVR models):
  ``α = √ᾱ``, ``σ = √(1 − ᾱ)`` from the scheduler's ``alphas_cumprod``; integer training timesteps
  ``0 … T − 1`` (Euler-type samplers also call the network between them; ᾱ is interpolated linearly there);
* **rectified flow** (``"flow"``; ``FlowMatchEulerDiscreteScheduler`` — SD3, Flux): ``x_t = (1 − σ) x₀ + σ ε``
  with ``σ = timestep / T``, so ``α = 1 − σ``; timesteps are continuous in ``[0, T]`` (sampling starts at
  ``T`` exactly, pure noise). Resolution-dependent *shifts* change which timesteps a sampler visits, never the
  relation σ = timestep / T at a visited timestep, so the schedule does not depend on them.

A noise *fraction* ``t ∈ [0, 1]`` (every verb's ``t``) maps to a timestep by :meth:`Schedule.timestep`: the
nearest integer timestep ``round(t · (T − 1))`` for VP (unchanged from before flows existed), and
``t · T`` (σ = t) for flows. :meth:`Schedule.fraction` is its inverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

ScheduleKind = Literal["vp", "flow"]


def is_flow_scheduler(scheduler: Any) -> bool:
    """Whether a diffusers scheduler samples a rectified flow (``FlowMatch*`` schedulers)."""
    return type(scheduler).__name__.startswith("FlowMatch")


@dataclass(frozen=True)
class Schedule:
    """A noise schedule: ``x_t = α(timestep) x₀ + σ(timestep) ε``.

    Attributes:
        kind: ``"vp"`` (variance preserving, from ``alphas_cumprod``) or ``"flow"`` (rectified flow).
        num_train_timesteps: ``T``.
        alphas_cumprod: ``(T,)`` float64 ᾱ for VP schedules, ``None`` for flows.
    """

    kind: ScheduleKind
    num_train_timesteps: int
    alphas_cumprod: Tensor | None = None

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> Schedule:
        """The schedule of a diffusers scheduler (``FlowMatch*`` → flow, else its ``alphas_cumprod``).

        Raises:
            ValueError: a scheduler that is neither (names what was looked for).
        """
        T = int(scheduler.config["num_train_timesteps"])
        if is_flow_scheduler(scheduler):
            return cls("flow", T)
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise ValueError(
                f"scheduler {type(scheduler).__name__} has no alphas_cumprod noise schedule and is not a flow-matching "
                "(FlowMatch*) scheduler; pass a DDPM/DDIM/Euler or FlowMatchEulerDiscreteScheduler"
            )
        return cls("vp", T, torch.as_tensor(alphas, dtype=torch.float64))

    @property
    def max_timestep(self) -> int:
        """The largest valid training timestep: ``T − 1`` for VP, ``T`` (pure noise) for flows."""
        return self.num_train_timesteps - 1 if self.kind == "vp" else self.num_train_timesteps

    def _values(self, timestep: Tensor | float | int) -> Tensor:
        ts = torch.as_tensor(timestep, dtype=torch.float64).detach().cpu()
        if not torch.isfinite(ts).all():
            raise ValueError(f"timestep contains NaN or Inf: {ts.flatten()[:8].tolist()}")
        last = self.max_timestep
        if (ts < 0).any() or (ts > last).any():
            raise ValueError(f"timesteps must lie in [0, {last}], got {ts.flatten()[:8].tolist()}")
        return ts

    def alpha_bar(self, timestep: Tensor | float | int) -> Tensor:
        """VP only: ᾱ at ``timestep`` (scalar or ``(B,)``), linearly interpolated; float64 of its shape, on CPU."""
        if self.alphas_cumprod is None:
            raise ValueError("a flow schedule has no alphas_cumprod (ᾱ); use alpha(timestep) and sigma(timestep)")
        ts = self._values(timestep)
        T = self.alphas_cumprod.shape[0]
        lo = ts.floor().long().clamp(max=T - 1)
        hi = (lo + 1).clamp(max=T - 1)
        w = ts - lo
        return (1 - w) * self.alphas_cumprod[lo] + w * self.alphas_cumprod[hi]

    def alpha(self, timestep: Tensor | float | int) -> Tensor:
        """Signal coefficient α at ``timestep``: √ᾱ (VP) or 1 − timestep / T (flow); float64 of its shape, on CPU."""
        if self.kind == "vp":
            return self.alpha_bar(timestep).sqrt()
        return 1 - self._values(timestep) / self.num_train_timesteps

    def sigma(self, timestep: Tensor | float | int) -> Tensor:
        """Noise std σ at ``timestep``: √(1 − ᾱ) (VP) or timestep / T (flow); float64 of its shape, on CPU."""
        if self.kind == "vp":
            return (1 - self.alpha_bar(timestep)).sqrt()
        return self._values(timestep) / self.num_train_timesteps

    def timestep(self, fraction: float | Sequence[float] | Tensor) -> Tensor:
        """Training timestep(s) at noise ``fraction`` ∈ [0, 1] (0 clean, 1 pure noise), of ``fraction``'s shape.

        VP: the nearest integer timestep (long). Flow: ``fraction · T`` as float32 (the dtype flow pipelines
        pass), so σ = ``fraction`` up to float32 rounding.
        """
        if isinstance(fraction, bool):
            raise TypeError(f"fraction must be a noise fraction in [0, 1], got the bool {fraction!r}")
        f = torch.as_tensor(fraction, dtype=torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError(f"fraction must be a noise fraction in [0, 1], got NaN or Inf: {f.flatten()[:8].tolist()}")
        if (f < 0).any() or (f > 1).any():
            raise ValueError(f"fraction (noise fraction) must lie in [0, 1], got {f.flatten()[:8].tolist()}")
        if self.kind == "vp":
            return torch.round(f * (self.num_train_timesteps - 1)).long()
        return (f * self.num_train_timesteps).float()

    def fraction(self, timestep: Tensor | float | int) -> Tensor:
        """The noise fraction of training ``timestep``: the inverse of :meth:`timestep` (float64, on CPU)."""
        return self._values(timestep) / self.max_timestep


def scheduler_step(scheduler: Any, timestep: Any = None) -> int | None:
    """The denoising step a network call belongs to, read from the sampler's ``scheduler`` (``None``: unknown).

    A step is one ``num_inference_steps`` unit, not one network call: Heun's second-order correction calls the
    network again within the same step. Schedulers that keep a ``step_index`` (Euler, Heun, DPM, flow matching)
    give ``step_index // order`` (``None`` before the first ``step()`` means step 0); the others (DDIM, DDPM,
    PNDM) give the position of the call's ``timestep`` in ``scheduler.timesteps`` when it occurs there once.
    """
    if hasattr(scheduler, "step_index"):
        index = scheduler.step_index
        begin = getattr(scheduler, "begin_index", None)
        index = (begin or 0) if index is None else index
        return int(index) // int(getattr(scheduler, "order", 1) or 1)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or timestep is None:
        return None
    ts = torch.as_tensor(timestep).detach().reshape(-1)[:1].to(timesteps.device, timesteps.dtype)
    if ts.numel() == 0:
        return None
    hits = torch.nonzero(timesteps == ts[0]).flatten()
    return int(hits[0]) if hits.numel() == 1 else None
