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

from interp.conditioning import Conditioning
from interp.context import denoising_step
from interp.denoiser import CondLike, Denoiser

SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "ddpm": "DDPMScheduler"}


class StepCallback(Protocol):
    """``callback(step, timestep, latents, prediction)``, called after each scheduler step.

    ``latents`` is the sampler state *after* the step; ``prediction`` the (guided) network output.
    """

    def __call__(self, step: int, timestep: Tensor, latents: Tensor, prediction: Tensor) -> None: ...


def make_scheduler(kind: str | Any, like: Any) -> Any:
    """A fresh scheduler of ``kind`` (``"ddim"``, ``"euler"``, ``"ddpm"``, or an instance) sharing ``like``'s schedule."""
    import diffusers

    if not isinstance(kind, str):
        return kind.__class__.from_config(kind.config)
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose one of {sorted(SCHEDULERS)} or pass a diffusers scheduler")
    cls = getattr(diffusers, SCHEDULERS[kind])
    return cls.from_config(like.config)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    cond: CondLike,
    *,
    shape: Sequence[int],
    num_steps: int = 50,
    seed: int = 0,
    scheduler: str | Any = "ddim",
    guidance_scale: float | None = None,
    callbacks: Sequence[StepCallback] = (),
    latents: Tensor | None = None,
) -> Tensor:
    """Run the reverse process and return the final sample ``(B, C, H, W)``.

    Args:
        denoiser: the network to sample from.
        cond: one :class:`Conditioning` for every sample, or one per sample.
        shape: ``(B, C, H, W)`` of the sample.
        num_steps: number of denoising steps.
        seed: seeds the initial noise (drawn on CPU, so the same seed gives the same numbers on any device).
        scheduler: ``"ddim"`` (deterministic, η = 0), ``"euler"``, ``"ddpm"`` or a diffusers scheduler.
        guidance_scale: overrides the denoiser's CFG scale.
        callbacks: called after every step, see :class:`StepCallback`.
        latents: start from these ``x_T`` instead of seeded noise.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sched = make_scheduler(scheduler, denoiser.scheduler)
    sched.set_timesteps(num_steps, device=denoiser.device)
    gen = torch.Generator("cpu").manual_seed(seed)
    if latents is None:
        x = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
        x = x.to(denoiser.device) * sched.init_noise_sigma
    else:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
        x = latents.to(denoiser.device, torch.float32)
    if isinstance(cond, Conditioning):
        cond = [cond] * shape[0]
    step_kwargs: dict[str, Any] = {}
    if "generator" in sched.step.__code__.co_varnames:
        step_kwargs["generator"] = gen
    for i, t in enumerate(sched.timesteps):
        with denoising_step(i):
            model_in = sched.scale_model_input(x, t)
            pred = denoiser(model_in, t, cond, guidance_scale=guidance_scale)
        x = sched.step(pred, t, x, **step_kwargs).prev_sample
        for cb in callbacks:
            cb(i, t, x, pred)
    return x
