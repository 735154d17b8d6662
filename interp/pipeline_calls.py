"""Labels of the network calls a diffusers pipeline makes by itself, with nobody announcing them.

Inside ``interp.sample`` or a :class:`~interp.Denoiser` call, the driver says which step and which CFG branch
each network call is (:mod:`interp.context`). A family's own pipeline (``pipe(prompt, ...)``) says nothing, yet a
capture or an intervention wrapped around it needs the same labels. They are read, never counted:

* the **step** from the pipeline's scheduler (:func:`interp.schedule.scheduler_step`: Heun's two calls per step
  are one step);
* the **branches** from the family's CFG layout, verified on the call itself
  (:meth:`interp.adapters.Adapter.pipeline_branches`: equal latent halves, DiT's null-class rows, Flux's
  cond-then-negative calls), with the pipeline's own ``do_classifier_free_guidance`` where it has one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from interp.adapters import Adapter
from interp.schedule import scheduler_step


def pipeline_of(target: Any) -> Any:
    """``target`` when it is a diffusers pipeline with a scheduler (not a Denoiser or a module), else ``None``."""
    from interp.denoiser import Denoiser

    if isinstance(target, (nn.Module, Denoiser)) or not hasattr(target, "scheduler"):
        return None
    return target


def pipeline_cfg(pipeline: Any) -> bool | None:
    """The pipeline's own CFG flag for the running call (SD, SDXL, SD3), ``None`` where it keeps it in locals."""
    try:
        flag = getattr(pipeline, "do_classifier_free_guidance", None)
    except AttributeError:  # the property reads state the pipeline sets only inside __call__
        return None
    return None if flag is None else bool(flag)


def call_timestep(args: tuple, kwargs: dict) -> Any:
    """The timestep a network call received (keyword, or the second positional argument of a U-Net)."""
    return kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)


class PipelineCalls:
    """Labels the successive network calls of one pipeline run (create one per capture / intervention block)."""

    def __init__(self, pipeline: Any, adapter: Adapter) -> None:
        self.pipeline = pipeline
        self.adapter = adapter
        self._per_step: dict[int | None, int] = {}  # step -> calls begun in it (Flux's true CFG: cond, then uncond)

    def step(self, args: tuple, kwargs: dict) -> int | None:
        """The denoising step of a call, from the scheduler (``None`` when the scheduler cannot say)."""
        return scheduler_step(self.pipeline.scheduler, call_timestep(args, kwargs))

    def branches(self, args: tuple, kwargs: dict, step: int | None) -> tuple[tuple[str, slice], ...]:
        """The CFG branches of a call of ``step`` (counts the call in its step)."""
        done = self._per_step.get(step, 0)
        self._per_step[step] = done + 1
        return self.adapter.pipeline_branches(args, kwargs, cfg=pipeline_cfg(self.pipeline), call_in_step=done)
