"""``record``: :func:`interp.capture` that also understands the site ``"output"`` (the U-Net's own output).

Patching the prediction itself (``Patch("output", FromStore(store))``) needs a store holding the source
run's outputs under the site ``"output"``, which :func:`interp.capture.capture` does not resolve (it names
submodules only). ``record`` runs ``capture`` for the other sites and records the U-Net's output into the
same store, keyed by the step and branches the Denoiser announces (step ``-1`` outside a sampling loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

from interp.capture import Capture, capture, unet_of
from interp.context import current_call
from interp.hooks import HookSet, primary_tensor
from interp.site import Site, as_sites
from interp.store import ActivationKey, ActivationStore, MemoryStore

from interventions.edits import OUTPUT


class Recording:
    """What :func:`record` yields: ``.store`` holds every captured tensor (``.capture``: the inner Capture, if any)."""

    def __init__(self, store: ActivationStore, cap: Capture | None) -> None:
        self._store = store
        self.capture = cap

    @property
    def store(self) -> ActivationStore:
        # A capture that spills over its memory budget swaps its store for a disk store: follow it.
        return self.capture.store if self.capture is not None else self._store

    def frame(self):
        """Tidy frame of what was recorded (see ``ActivationStore.frame``)."""
        return self.store.frame()


@contextlib.contextmanager
def record(target: Any, sites: str | Site | Iterable[str | Site], **capture_kwargs: Any) -> Iterator[Recording]:
    """Capture ``sites`` (module paths/globs/Sites, and ``"output"``) for everything run inside the block.

    Args:
        target: Denoiser, pipeline or U-Net.
        sites: as for :func:`interp.capture.capture`, plus ``"output"`` (or ``Site("output", steps=..., branch=...)``)
            for the U-Net's output ``(B, C, H, W)``.
        capture_kwargs: passed to :func:`interp.capture.capture` (``store=``, ``budget=``, ...).

    Yields:
        A :class:`Recording`; ``rec.store`` is the store to patch from (``FromStore(rec.store)``).
    """
    site_list = as_sites(sites)
    outputs = [s for s in site_list if s.path == OUTPUT]
    others = [s for s in site_list if s.path != OUTPUT]
    if outputs and any(k in capture_kwargs for k in ("cfg", "count_steps")):
        raise ValueError("record('output') labels calls by what the Denoiser announces; cfg=/count_steps= apply to "
                         "raw pipeline calls only: drive the model through an interp.Denoiser")
    unet: nn.Module = unet_of(target)
    with contextlib.ExitStack() as stack:
        cap = stack.enter_context(capture(target, others, **capture_kwargs)) if others else None
        store = cap.store if cap is not None else capture_kwargs.get("store", "memory")
        if cap is None:
            if not isinstance(store, ActivationStore):
                if store != "memory":
                    raise ValueError("record(['output']) alone keeps its store in memory; pass store=MemoryStore() "
                                     "or add a module site to stream to a folder")
                store = MemoryStore(metadata=target.metadata() if hasattr(target, "metadata") else {})
        rec = Recording(store, cap)
        if outputs:
            counter = [1 + max((k.call for k in rec.store.keys()), default=-1)]

            def on_output(module: nn.Module, args: tuple, out: Any) -> None:
                tensor: Tensor = primary_tensor(out)
                ctx = current_call()
                step = -1 if ctx is None or ctx.step is None else ctx.step
                call = counter[0]
                counter[0] += 1
                branches = ctx.branch_slices(tensor.shape[0]) if ctx else (("cond", slice(0, tensor.shape[0])),)
                for name, sl in branches:
                    for site in outputs:
                        if site.applies(None if step < 0 else step, name):
                            rec.store.put(ActivationKey(OUTPUT, step, name, call), tensor[sl].detach().to("cpu", copy=True))
                            break

            hooks = stack.enter_context(HookSet())
            hooks.forward(unet, on_output)
        yield rec


__all__ = ["Recording", "record"]
