"""Activation patching through nnsight 0.8: :class:`~interventions.Patch` edits written by nnsight's
intervention API instead of torch hooks, with the same bits as :func:`interventions.apply`.

How it runs
-----------
``patch_nnsight(den, patches, run)`` wraps the U-Net in ``nnsight.NNsight`` (or reuses a held wrapper,
``envoy=``), and runs ``run()`` as ``model.trace(fn=run)``. Each patched module gets one worker (one
``tracer.invoke()``) whose loop ``for k in tracer.iter[...]`` visits that module at every U-Net call ``k``:
it reads the call's ``.inputs`` (batch and ``(H, W)``), reads the module's ``.output``, and — where a Patch
selects the call's step and CFG branch — assigns ``envoy.output = <patched value>``, which nnsight hands to
the rest of the forward in place of the module's own output. ``"output"`` (the U-Net's own prediction) is
the root envoy's output.

Why the bits match ``apply``
----------------------------
The patched value is computed by the very code ``apply``'s hooks run (:meth:`Applied._patch`: source
resolution through ``Source.value`` with the same per-run cache, branch-row slicing, ``region``/``channels``
writing, ``replace_primary``), on the same module output; only the *delivery* differs (nnsight's controller
instead of a forward hook). Site resolution, ``FromStore`` / ``Mean`` fail-fast checks and the live-edit
conflict check are ``Applied``'s too, so a typo or a store lacking a site fails before the run, as with
``apply``. ``applied.frame()`` lists what fired.

Labels: declared, as in :func:`interp.nnsight_backend.capture_nnsight`
----------------------------------------------------------------------
nnsight's workers run in their own greenlet context, where the step / branch a Denoiser or sampling loop
announces (:mod:`interp.context`) cannot be read. So the run's layout is declared
(:class:`interp.nnsight_backend.CallLayout`): ``cfg`` (``"auto"`` reads a Denoiser's ``guidance_scale`` /
``cfg_mode``) and ``count_steps`` (call ``k`` is step ``k``, or ``k // 2`` for separate CFG; ``True`` for
sampling loops; else every call has step ``None`` and a ``steps=`` selection matches nothing — as under
``apply`` outside a loop). The number of U-Net calls is counted and checked after the run (``calls=``), as is
that every patched module ran exactly once per call.

What is not expressed (and refused or documented)
-------------------------------------------------
* :class:`~interventions.MaskCrossAttention` (an attention-processor swap) and
  :class:`~interventions.Compose` (expands the U-Net batch with auxiliary rows): ``NotImplementedError``,
  use :func:`interventions.apply`.
* :class:`~interventions.Fn` sources get a :class:`~interventions.CallInfo` with ``conditionings=()`` and
  ``timestep=None``: the per-row conditionings are announced through context variables the workers cannot
  read. (A Denoiser announces no timestep, so ``apply`` gives ``None`` there too.)
* A module called several times within one U-Net call is refused after the run (its occurrences would no
  longer be U-Net calls).
* nnsight is imported lazily, inside :func:`patch_nnsight` only: ``import interventions`` does not import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from interp.capture import unet_of
from interp.hooks import primary_tensor

from interventions.applied import Applied, _Call, _flatten
from interventions.edits import OUTPUT, Compose, Edit, MaskCrossAttention, Patch


def _check_edits(patches: Any) -> list[Patch]:
    """Flatten ``patches`` and refuse edits that nnsight patching does not express."""
    if isinstance(patches, Edit):
        patches = [patches]
    elif not isinstance(patches, (list, tuple)):
        raise TypeError(f"patch_nnsight(patches=...) must be a Patch or a list of Patches, got {type(patches).__name__}")
    edits = _flatten(patches)
    if not edits:
        raise ValueError("patch_nnsight(patches=...) is empty; pass at least one interventions.Patch")
    for edit in edits:
        if isinstance(edit, (MaskCrossAttention, Compose)):
            why = ("swaps attention processors" if isinstance(edit, MaskCrossAttention)
                   else "appends auxiliary rows to the U-Net batch")
            raise NotImplementedError(
                f"patch_nnsight does not run {type(edit).__name__} edits ({edit.label!r}): it {why}, which is not a "
                "module-output replacement; run it with interventions.apply(target, edit)"
            )
    return edits  # type: ignore[return-value]


class _Run:
    """Per-run state shared by the workers: call count and visits per patched module."""

    def __init__(self) -> None:
        self.calls_seen = 0
        self.visits: dict[str, int] = {}

    def check(self, expected_calls: int | None, paths: list[str]) -> None:
        if self.calls_seen == 0:
            raise RuntimeError("the run made no U-Net call; nothing was patched")
        if expected_calls is not None and expected_calls != self.calls_seen:
            raise RuntimeError(
                f"calls={expected_calls} was declared but the run made {self.calls_seen} U-Net calls; "
                "pass the right number (steps x CFG calls per step) or calls=None"
            )
        odd = {p: self.visits.get(p, 0) for p in paths if self.visits.get(p, 0) != self.calls_seen}
        if odd:
            raise RuntimeError(
                f"patch_nnsight needs every patched module to run once per U-Net call ({self.calls_seen} calls); "
                f"seen {odd}. Use interventions.apply for it"
            )


def _call_state(layout: Any, call: int, unet_inputs: tuple[tuple, dict], out: Any, path: str) -> _Call:
    """The :class:`_Call` that ``apply``'s pre-hook would build for U-Net call ``call``, from the declared layout."""
    args, kwargs = unet_inputs
    x = args[0] if args else kwargs.get("sample")
    act = primary_tensor(out)
    batch = int(x.shape[0]) if isinstance(x, Tensor) else int(act.shape[0])
    if int(act.shape[0]) != batch:  # the same refusal as apply's: rows would be mislabelled
        raise ValueError(f"module {path!r} ran with batch {int(act.shape[0])} inside a U-Net call of {batch} rows; "
                         "interventions assume the batch of the U-Net call at every site")
    step, branches = layout.label(call, batch)
    return _Call(step=step if layout.count_steps else None, timestep=None, branches=branches, conditionings=(),
                 image_hw=tuple(x.shape[-2:]) if isinstance(x, Tensor) and x.dim() == 4 else None, batch=batch)


def _count_calls(tracer: Any, model: Any, state: _Run) -> None:
    """Worker: count the U-Net's calls (open loop, ended by the run's end)."""
    for _ in tracer.iter[:]:
        model.output
        state.calls_seen += 1


def _patch_site(tracer: Any, model: Any, envoy: Any, path: str, edits: list[int], calls: int | None,
                layout: Any, applied: Applied, state: _Run) -> None:
    """Worker: at every U-Net call, patch one module's output with its edits, in edit order (as apply's hooks)."""
    for k in tracer.iter[:calls] if calls is not None else tracer.iter[:]:
        inputs = model.inputs  # read first: the U-Net's inputs come before any submodule's output
        out = envoy.output
        call = _call_state(layout, k, inputs, out, path)
        new = out
        for i in edits:
            new = applied._patch(i, path, new, call)
        if new is not out:
            envoy.output = new
        state.visits[path] = state.visits.get(path, 0) + 1


def _read_result(tracer: Any, box: dict[str, Any]) -> None:
    """Worker: keep what the traced function returned."""
    box["value"] = tracer.result


def patch_nnsight(
    target: Any,
    patches: Patch | Iterable[Patch],
    run: Callable[[], Any],
    *,
    calls: int | None = None,
    cfg: str | None = "auto",
    count_steps: bool | None = None,
    envoy: Any = None,
) -> tuple[Applied, Any]:
    """Run ``run()`` under nnsight with ``patches`` replacing module outputs; same bits as :func:`interventions.apply`.

    Args:
        target: a :class:`~interp.Denoiser` or the U-Net module that ``run`` drives.
        patches: a :class:`~interventions.Patch` or a list of them (sources ``Zero``, ``FromStore``, ``Mean``,
            ``Fn``; ``steps``/``branch``/``region``/``channels`` selections; site ``"output"`` for the U-Net's
            prediction). ``MaskCrossAttention`` / ``Compose`` raise ``NotImplementedError``.
        run: a callable making the U-Net calls, e.g. ``lambda: den.predict(x, 500, cond)`` or
            ``lambda: interp.sample(den, cond, shape=..., num_steps=3)``.
        calls: the number of U-Net calls ``run`` makes (bounds the workers' loops; checked after the run).
            ``None``: loop until the run ends.
        cfg: CFG shape of the calls, ``"batched"`` (``[uncond; cond]`` halves), ``"separate"`` (calls alternate
            ``uncond``, ``cond``) or ``None``; ``"auto"`` reads a Denoiser's ``guidance_scale`` / ``cfg_mode``.
            Must describe what ``run`` does: a ``den.predict(..., branch="cond")`` call is one ``cond`` branch.
        count_steps: label call k with its denoising step (``True`` for sampling loops); else steps are ``None``.
        envoy: an ``NNsight`` envoy of the same U-Net from an enclosing
            :func:`interp.nnsight_backend.instrumented` block, to reuse across runs (wrapping costs about one
            forward of the tiny U-Net); by default the U-Net is wrapped for this run only and unwrapped after.

    Returns:
        ``(applied, result)``: ``applied.frame()`` lists what fired (one row per edit, site, step, branch;
        it is not entered, so it holds no hooks), ``result`` is what ``run`` returned, e.g. the ``(B, C, H, W)``
        prediction or sample.

    Raises:
        NotImplementedError: an edit other than a Patch.
        interp.site.SiteError / KeyError: a site names no module / a store lacks a patched site (before the run).
        interventions.EditConflictError: a live ``apply`` block already edits one of these modules.
        RuntimeError: the run's calls did not match ``calls=`` or a patched module did not run once per call.
    """
    from interp.nnsight_backend import _loop_end_quiet, envoy_at, instrumented, layout_for

    edits = _check_edits(patches)
    if calls is not None and (isinstance(calls, bool) or not isinstance(calls, int) or calls < 1):
        raise ValueError(f"patch_nnsight(calls={calls!r}) must be a positive int (the run's U-Net calls) or None")
    layout = layout_for(target, cfg, count_steps)
    unet = unet_of(target)
    if envoy is not None and envoy._module is not unet:
        raise ValueError("envoy= must wrap the very U-Net that the target runs (from instrumented(den.unet))")
    applied = Applied(target, edits)
    applied._resolve()  # sites and sources, checked before anything runs (as apply's __enter__)
    by_path: dict[str, list[int]] = {}
    for i, path, _ in applied._resolved:
        by_path.setdefault(path, []).append(i)
    applied._claim()  # refuse a live apply block editing the same modules
    state, box = _Run(), {}
    try:
        wrap = contextlib.nullcontext(envoy) if envoy is not None else instrumented(unet)
        with wrap as model, _loop_end_quiet():
            jobs = [(path, model if path == OUTPUT else envoy_at(model, path), idx) for path, idx in by_path.items()]
            with model.trace(fn=run) as tracer:
                with tracer.invoke():
                    _count_calls(tracer, model, state)
                for path, env, idx in jobs:
                    with tracer.invoke():
                        _patch_site(tracer, model, env, path, idx, calls, layout, applied, state)
                with tracer.invoke():
                    _read_result(tracer, box)
    finally:
        applied._release()
    state.check(calls, list(by_path))
    return applied, box.get("value")


__all__ = ["patch_nnsight"]
