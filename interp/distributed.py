"""Sweeps on several processes: the torch.distributed substrate shared by every resumable sweep *(ours)*.

A sweep is a list of independent *units* (a ``(site, t, seed)`` of a locality sweep, an ``(intervention, k)`` of
an intervention sweep, a ``(k, sample batch)`` of ``clevr eval``), each written to its own part file the moment it
finishes. Launched under ``torchrun --nproc_per_node=N`` (or ``accelerate launch``, SLURM ``srun`` with the
torch.distributed variables set: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) the
same command splits its units across the processes. No scheduler of ours: the launcher starts the processes,
torch.distributed connects them, and this module only

* detects the environment (:func:`detect_env`; a plain ``python`` run is one process, nothing is initialised);
* initialises a ``gloo`` process group and destroys it on every exit path (:func:`distributed`). Only small Python
  objects travel between processes (the pending unit list, a refusal), so gloo serves CPU and GPU runs alike and
  needs no device mapping; each process still computes on its own device (:meth:`Distributed.device`:
  ``cuda:LOCAL_RANK`` when CUDA is present);
* runs the folder claim and the settings check on rank 0 and shares the verdict (:meth:`Distributed.on_main`), so
  a refused configuration stops every rank with the one message;
* assigns units (:meth:`Distributed.my_units`): rank 0 lists the units without a part file, in the sweep's own
  order, and every rank takes every ``WORLD_SIZE``-th of them starting at its ``RANK``. Units carry their own seeds,
  so the numbers never depend on which rank ran a unit, nor in which order;
* waits for every rank (:meth:`Distributed.barrier`) before rank 0 merges the parts into the table and figures a
  single process writes.

A rank killed mid-sweep loses only its unfinished unit (part files are atomic; the launcher then stops the other
ranks); relaunching the same command resumes from the parts, recomputing nothing that finished.

Environment: ``SCORESCOPE_DIST_TIMEOUT_S`` — how long a rank waits for the others (default 86400: a rank that
finishes early waits at the final barrier for the slowest). ``SCORESCOPE_DIST_KILL_AFTER=RANK:N`` is a test hook:
that rank SIGKILLs itself right after writing its N-th part (to test recovery from a lost rank).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

T = TypeVar("T")

ENV_TIMEOUT = "SCORESCOPE_DIST_TIMEOUT_S"
ENV_KILL = "SCORESCOPE_DIST_KILL_AFTER"


class RankAborted(RuntimeError):
    """Raised on ranks other than 0 when rank 0 refused the run (rank 0 raises, and prints, the real error)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"the environment variable {name}={raw!r} is not an integer; launch with torchrun, which sets it") from None


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (one process when ``WORLD_SIZE`` is unset or 1).

    Raises ``ValueError`` naming the variable when they are malformed or incomplete.
    """
    env = os.environ if environ is None else environ
    world = _int_var(env, "WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if world == 1:
        return DistEnv()
    if "RANK" not in env:
        raise ValueError(f"WORLD_SIZE={world} but RANK is not set; launch with torchrun (or set RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    rank = _int_var(env, "RANK", 0)
    local = _int_var(env, "LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0…{world - 1} (WORLD_SIZE={world})")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with torchrun, which sets it")
    return DistEnv(rank, world, local)


def rank_device(requested: str | None = None, env: DistEnv | None = None) -> str:
    """The device this process computes on: ``requested`` (``"cuda"`` becomes ``cuda:LOCAL_RANK`` on several
    processes), else the GPU when CUDA is present (``cuda:LOCAL_RANK`` on several processes), else ``"cpu"``."""
    env = detect_env() if env is None else env
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and env.world_size > 1:
        requested = f"cuda:{env.local_rank}"
    return requested


class Distributed:
    """This process's share of a sweep (see the module docstring). One process: nothing is communicated."""

    def __init__(self, env: DistEnv, group: bool) -> None:
        self.env = env
        self._group = group
        self._parts_written = 0
        kill = os.environ.get(ENV_KILL, "")
        rank, _, count = kill.partition(":")
        if kill and not (rank.isdigit() and count.isdigit()):
            raise ValueError(f"{ENV_KILL}={kill!r} must look like RANK:N (a test hook: that rank dies after N parts)")
        self._kill_after = int(count) if kill and int(rank) == env.rank else None

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def device(self, requested: str | None = None) -> str:
        """:func:`rank_device`, made the current CUDA device when it is one."""
        where = rank_device(requested, self.env)
        if where.startswith("cuda:"):
            torch.cuda.set_device(torch.device(where))
        return where

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self._group:
            torch.distributed.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self._group:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its result on every rank.

        A ``ValueError`` / ``OSError`` (a refused folder or configuration) is re-raised on rank 0 and raises
        :class:`RankAborted` with the same message on the other ranks, so no rank waits for work that never comes.
        """
        if not self._group:
            return fn()
        if self.is_main:
            try:
                value = fn()
            except (ValueError, OSError) as err:
                self.broadcast(("error", f"{type(err).__name__}: {err}"))
                raise
            return self.broadcast(("ok", value))[1]
        status, value = self.broadcast(None)  # type: ignore[misc]
        if status == "error":
            raise RankAborted(f"rank 0 refused the run: {value}")
        return value

    def pending(self, units: Sequence[T], done: Callable[[T], bool] | None = None) -> list[T]:
        """The units not yet ``done`` (e.g. "its part file exists"), as rank 0 sees them, on every rank.

        Decided once, on rank 0, so every rank works from the same list even while other ranks' parts appear.
        """
        index = self.on_main(lambda: [i for i, u in enumerate(units) if done is None or not done(u)])
        return [units[i] for i in index]

    def share(self, units: Sequence[T]) -> list[T]:
        """This rank's share of ``units`` (the same list on every rank): ``r, r + W, r + 2W, …`` for rank ``r``."""
        return list(units[self.rank :: self.world_size])

    def my_units(self, units: Sequence[T], done: Callable[[T], bool] | None = None) -> list[T]:
        """This rank's share (:meth:`share`) of the :meth:`pending` units, in the sweep's order."""
        return self.share(self.pending(units, done))

    def part_written(self) -> None:
        """Call after each part file: counts them (and applies the ``SCORESCOPE_DIST_KILL_AFTER`` test hook)."""
        self._parts_written += 1
        if self._kill_after is not None and self._parts_written >= self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def single_process() -> Distributed:
    """A :class:`Distributed` of one process whatever the environment says (for work nested in a rank's unit)."""
    return Distributed(DistEnv(), group=False)


def _timeout() -> timedelta:
    raw = os.environ.get(ENV_TIMEOUT, "86400")
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{ENV_TIMEOUT} must be > 0 seconds, got {raw!r}")
    return timedelta(seconds=seconds)


_STORE: Any = None
_GENERATION = 0


def _new_group(env: DistEnv) -> None:
    """Initialise the default process group (gloo) on a fresh key prefix of this process's one rendezvous store.

    A process may run several sweeps one after another: a second ``init_process_group("env://")`` would find the
    first group's keys in the launcher's store and connect to ranks that are gone, so the store is made once and
    every group gets its own prefix (the same on every rank: the ranks run the same sweeps in the same order).
    """
    global _STORE, _GENERATION
    dist = torch.distributed
    if _STORE is None:
        _STORE, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size, timeout=_timeout()))
    _GENERATION += 1
    store = dist.PrefixStore(f"scorescope/{_GENERATION}", _STORE)
    dist.init_process_group("gloo", store=store, rank=env.rank, world_size=env.world_size, timeout=_timeout())


@contextmanager
def distributed() -> Iterator[Distributed]:
    """This process's :class:`Distributed`; the process group is created here and destroyed on every exit path.

    A process group that already exists (a caller's own, or accelerate's) is used and left as it is.
    """
    env = detect_env()
    dist = torch.distributed
    owns = False
    if env.world_size > 1 and not dist.is_initialized():
        _new_group(env)
        owns = True
    try:
        yield Distributed(env, group=env.world_size > 1)
    finally:
        if owns:
            dist.destroy_process_group()


__all__ = ["DistEnv", "Distributed", "ENV_KILL", "ENV_TIMEOUT", "RankAborted", "detect_env", "distributed", "rank_device", "single_process"]
