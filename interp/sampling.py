"""Sampling: the reverse-diffusion loop over a diffusers scheduler, with per-step callbacks.

The loop announces each step (:func:`interp.context.denoising_step`) so that captures and interventions
know which step a U-Net call belongs to, and calls the :class:`~interp.Denoiser` — not the raw U-Net — so
classifier-free guidance and its branch labels are the same here as in every probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from interp.conditioning import Conditioning, ConditioningBatch
from interp.context import denoising_step
from interp.denoiser import CondLike, Denoiser
from interp.schedule import scheduler_step
from interp.validation import check_guidance_scale, check_int

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "flow": "FlowMatchEulerDiscreteScheduler",
}
#: Which names sample which schedule: a VP network cannot be sampled by a flow-matching step, nor a flow by DDIM.
_KIND = {"ddim": "vp", "euler": "vp", "ddpm": "vp", "flow": "flow"}


class StepCallback(Protocol):
    """``callback(step, timestep, latents, prediction)``, called after each scheduler step (``step`` counts calls of
    ``scheduler.step``: a Heun step makes two).

    ``latents`` is the sampler state *after* the step; ``prediction`` the (guided) network output.
    """

    def __call__(self, step: int, timestep: Tensor, latents: Tensor, prediction: Tensor) -> None: ...


def make_scheduler(kind: str | Any, like: Any) -> Any:
    """A fresh scheduler of ``kind`` (``"ddim"``, ``"euler"``, ``"ddpm"``, ``"flow"``, or an instance) sharing ``like``'s schedule.

    ``"flow"`` is diffusers' ``FlowMatchEulerDiscreteScheduler`` (the Euler sampler of rectified flows: SD3,
    Flux); a name whose schedule differs from ``like``'s (``"ddim"`` for a flow model, ``"flow"`` for a VP
    model) is refused.
    """
    import diffusers

    from interp.schedule import is_flow_scheduler

    if not isinstance(kind, str):
        if not hasattr(kind, "config") or not hasattr(kind, "set_timesteps") or not hasattr(kind, "step"):
            raise TypeError(
                f"scheduler must be one of {sorted(SCHEDULERS)} or a diffusers scheduler, got {type(kind).__name__}"
            )
        return kind.__class__.from_config(kind.config)
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose one of {sorted(SCHEDULERS)} or pass a diffusers scheduler")
    have = "flow" if is_flow_scheduler(like) else "vp"
    if _KIND[kind] != have:
        fits = sorted(k for k, v in _KIND.items() if v == have)
        raise ValueError(
            f"scheduler {kind!r} samples a {_KIND[kind]} schedule but the model's {type(like).__name__} is {have}; "
            f"use one of {fits}"
        )
    cls = getattr(diffusers, SCHEDULERS[kind])
    return cls.from_config(like.config)


def _check_shape(den: Denoiser, shape: Sequence[int], cond: CondLike) -> tuple[int, int, int, int]:
    """``shape`` as ``(B, C, H, W)`` positive ints matching the model's channels and the conditionings."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise TypeError(f"shape must be (B, C, H, W), got {type(shape).__name__} {shape!r}")
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {tuple(shape)}")
    dims = tuple(check_int(f"shape[{i}]", s, minimum=1) for i, s in enumerate(shape))
    if den.in_channels is not None and dims[1] != den.in_channels:
        raise ValueError(
            f"shape has {dims[1]} channels but {den.name} takes {den.in_channels}: pass shape=(B, {den.in_channels}, H, W)"
        )
    if not isinstance(cond, (Conditioning, ConditioningBatch)):
        n = len(cond)
        if n != dims[0]:
            raise ValueError(f"{n} conditionings for shape[0] = {dims[0]} samples: pass one per sample, or one for all")
    return dims  # type: ignore[return-value]


@torch.no_grad()
def sample(
    den: Denoiser,
    cond: CondLike,
    *,
    shape: Sequence[int],
    num_steps: int = 50,
    seed: int = 0,
    scheduler: str | Any | None = None,
    guidance_scale: float | None = None,
    callbacks: Sequence[StepCallback] = (),
    latents: Tensor | None = None,
) -> Tensor:
    """Run the reverse process and return the final sample ``(B, C, H, W)``.

    Args:
        den: the network to sample from.
        cond: one :class:`Conditioning` for every sample, or one per sample.
        shape: ``(B, C, H, W)`` of the sample (``C`` must be the model's input channels).
        num_steps: number of denoising steps, ``1 … num_train_timesteps``.
        seed: seeds the initial noise (drawn on CPU, so the same seed gives the same numbers on any device).
        scheduler: ``"ddim"`` (deterministic, η = 0), ``"euler"``, ``"ddpm"`` (VP models), ``"flow"`` (flow-matching
            Euler, for flow models) or a diffusers scheduler. Default: ``"ddim"`` on VP models, ``"flow"`` on flows.
        guidance_scale: overrides the denoiser's CFG scale (finite, >= 0).
        callbacks: a list of callables, each called after every step, see :class:`StepCallback`.
        latents: start from these ``x_T`` ``(B, C, H, W)`` instead of seeded noise.
    """
    if not isinstance(den, Denoiser):
        raise TypeError(f"den must be an interp.Denoiser, got {type(den).__name__}; e.g. pipe.denoiser()")
    num_steps = check_int("num_steps", num_steps, minimum=1)
    if num_steps > den.num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds the schedule's {den.num_train_timesteps} training timesteps")
    shape = _check_shape(den, shape, cond)
    seed = check_int("seed", seed)
    check_guidance_scale(guidance_scale)
    hint = "callbacks must be a list of callables callback(step, timestep, latents, prediction)"
    if callable(callbacks) or isinstance(callbacks, (str, bytes)):
        raise TypeError(f"{hint}; wrap a single one as [callback]")
    callbacks = list(callbacks)  # once: a generator would be used up by the check below
    if not all(callable(cb) for cb in callbacks):
        raise TypeError(f"{hint}; got {[type(cb).__name__ for cb in callbacks]}")
    if scheduler is None:
        scheduler = "flow" if den.schedule.kind == "flow" else "ddim"
    sched = make_scheduler(scheduler, den.scheduler)
    den.adapter.set_timesteps(sched, num_steps, shape, den.device)  # as the family's pipeline does (Flux: its σ grid)
    gen = torch.Generator("cpu").manual_seed(seed)
    if latents is None:
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        x = x.to(den.device) * getattr(sched, "init_noise_sigma", 1.0)  # flow-matching schedulers have none (1)
    else:
        if not isinstance(latents, Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents have shape {got}, expected shape={shape}")
        x = latents.to(den.device, torch.float32)
    if isinstance(cond, Conditioning):
        cond = [cond] * shape[0]
    step_kwargs: dict[str, Any] = {}
    if "generator" in sched.step.__code__.co_varnames:
        step_kwargs["generator"] = gen
    for i, timestep in enumerate(sched.timesteps):
        # The scheduler's step, not the loop index: Heun calls the network twice per step.
        step = scheduler_step(sched, timestep)
        with denoising_step(i if step is None else step):
            model_in = sched.scale_model_input(x, timestep) if hasattr(sched, "scale_model_input") else x
            pred = den(model_in, timestep, cond, guidance_scale=guidance_scale)
        x = sched.step(pred, timestep, x, **step_kwargs).prev_sample
        for cb in callbacks:
            cb(i, timestep, x, pred)
    return x
