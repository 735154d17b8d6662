"""Which denoising step and which classifier-free-guidance branch a U-Net call belongs to.

A forward hook sees a module's input and output, nothing else: it cannot know that the batch it holds is
``[uncond; cond]`` of step 7. Whoever *drives* the U-Net (a :class:`~interp.Denoiser`, the sampling loop, a
pipeline adapter) knows, and says so by entering :func:`unet_call`. Hooks then read :func:`current_call`.

Branches are labelled explicitly as ``(name, batch-slice)`` pairs, so nothing ever assumes that a CFG
batch has two halves: a separate-call guider simply announces one branch per call.

A :class:`~interp.Denoiser` also announces the :class:`~interp.Conditioning` of every row of the batch
(``UNetCall.conditionings``): an edit inside the network that needs to know which tokens belong to which
conditioner and where it is (distance-masked cross-attention, feature-space composition) reads it here
instead of guessing from ``encoder_hidden_states``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

BRANCHES = ("uncond", "cond", "guided")
"""The three CFG branch names. ``guided`` is never a U-Net call of its own; it labels combined outputs."""


@dataclass(frozen=True)
class UNetCall:
    """Metadata of one U-Net forward call.

    Attributes:
        step: index of the denoising step (0-based) or ``None`` when no sampling loop is running.
        branches: ``(name, slice)`` pairs partitioning the call's batch dimension, e.g.
            ``(("uncond", slice(0, 2)), ("cond", slice(2, 4)))`` for batched CFG with two samples.
        timestep: the scheduler timestep of the call, when known.
        conditionings: the :class:`~interp.Conditioning` of each row of the batch (``()`` when unknown, e.g. a
            raw pipeline call or a ``ConditioningBatch``), in batch order.
    """

    step: int | None = None
    branches: tuple[tuple[str, slice], ...] = ()
    timestep: float | None = None
    conditionings: tuple[Any, ...] = ()

    def branch_slices(self, batch: int) -> tuple[tuple[str, slice], ...]:
        """The branch layout, defaulting to a single ``cond`` branch over the whole batch."""
        return self.branches or (("cond", slice(0, batch)),)


_CURRENT: contextvars.ContextVar[UNetCall | None] = contextvars.ContextVar("scorescope_unet_call", default=None)
_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar("scorescope_step", default=None)


def current_call() -> UNetCall | None:
    """The :class:`UNetCall` being executed, or ``None`` outside any announced call."""
    call = _CURRENT.get()
    step = _STEP.get()
    if call is None:
        return UNetCall(step=step) if step is not None else None
    if call.step is None and step is not None:
        return replace(call, step=step)
    return call


@contextlib.contextmanager
def unet_call(
    branches: Sequence[tuple[str, slice]] = (),
    *,
    step: int | None = None,
    timestep: float | None = None,
    conditionings: Sequence[Any] = (),
) -> Iterator[UNetCall]:
    """Announce that the U-Net calls inside this block have this step / branch layout (and row conditionings)."""
    call = UNetCall(step=step, branches=tuple(branches), timestep=timestep, conditionings=tuple(conditionings))
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def denoising_step(step: int) -> Iterator[None]:
    """Announce the denoising step index for every U-Net call inside the block (used by sampling loops)."""
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)


def batched_cfg_branches(batch: int, order: Sequence[str] = ("uncond", "cond")) -> tuple[tuple[str, slice], ...]:
    """Branch layout of one batched CFG call whose batch stacks ``len(order)`` equal blocks in ``order``.

    Raises:
        ValueError: if ``batch`` is not divisible by the number of branches.
    """
    n = len(order)
    if n == 0 or batch % n:
        raise ValueError(f"a batched CFG call of batch {batch} cannot hold {n} equal branches {tuple(order)}")
    b = batch // n
    return tuple((name, slice(i * b, (i + 1) * b)) for i, name in enumerate(order))
