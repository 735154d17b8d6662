"""The nnsight backend of capture: the same activations, read through nnsight 0.8 instead of torch hooks.

How nnsight reads an activation
-------------------------------
nnsight runs two things in lockstep on one thread: the model, and *intervention code* written inside
``with model.trace(...)``. Every module of a wrapped model gets a controller (installed in the module's
``__dict__["forward"]``, not as a torch hook). The intervention code runs in a greenlet (a "worker"); when
it reads ``envoy.output`` it *parks* on the location ``"<path>.output"``; when the forward pass reaches
that module, the controller hands the value over, the worker runs until it parks again, and the forward
continues. Two rules follow, and both shape this module:

* a worker must ask for locations in the order the model reaches them, and the k-th time the model
  reaches a location is its *occurrence* k (``for k in tracer.iter[...]`` pins a worker to occurrence k);
* only values ``.save()``d (or written into objects living outside the block) survive the trace.

How scorescope maps its capture onto that
-----------------------------------------
* **One worker per module.** Each resolved site module gets its own empty ``tracer.invoke()`` whose body
  loops over ``tracer.iter`` and reads that one module. Separate workers never wait on each other, so the
  capture does not need the U-Net's *execution* order (``named_modules`` lists ``up_blocks`` before
  ``mid_block``, the forward runs them the other way round). The workers share no values, so no
  ``tracer.barrier`` is needed; a last empty invoke reads ``tracer.result`` (what the run returned).
* **Occurrence k = U-Net call k.** A diffusers U-Net runs each of its submodules once per call, so the
  k-th occurrence of ``mid_block.output`` belongs to the k-th U-Net call of the run. Every worker also
  reads the U-Net's own ``.inputs`` at occurrence k (batch size and ``(H, W)``), and one extra worker
  counts the calls; after the run every module must have been seen exactly once per call, else the
  capture refuses (a module skipped or reused within a call would silently shift the labels).
* **Explicit labels.** A forward hook can read the step and CFG branch that a :class:`~interp.Denoiser`
  or the sampling loop announce through :mod:`interp.context`; nnsight's workers run in their own
  greenlet context and cannot. So the caller *declares* the run's layout (:class:`CallLayout`): ``cfg``
  (``"batched"``: each call's batch is ``[uncond; cond]`` halves, split by
  :func:`~interp.context.batched_cfg_branches` from the batch actually seen; ``"separate"``: calls
  alternate ``uncond``, ``cond``; ``None``: one ``cond`` branch) and ``count_steps`` (step = call index,
  or call index // 2 for separate CFG). For a Denoiser both default from its ``guidance_scale`` and
  ``cfg_mode``. A diffusers pipeline run through :class:`nnsight.modeling.diffusion.DiffusionModel`
  always gets ``count_steps=True`` and batched CFG when guidance is on, and the batch of every call is
  checked against ``2 × prompts × num_images_per_prompt``.
* **Same store, same bits.** Values go through :meth:`interp.capture.Capture.record` — the very code the
  torch hooks use (branch slicing, :meth:`Site.select` regions and channels, ``store_dtype``, a CPU copy,
  the memory budget and spilling) — the moment the module returns, so a streamed capture
  (``store=<folder>``) stays as flat in memory as with hooks. The run ends as a torch capture's block does:
  a store the capture opened is closed (``closed: false`` plus ``aborted`` when the run raised), and a
  site whose ``steps``/``branch`` matched no call raises :class:`~interp.capture.SiteSelectionError`. Tests check ``torch.equal`` between the
  two backends per site, step and branch.
* **The model is left as it was.** nnsight leaves its controllers in every module permanently ("inert
  outside a trace"); here they are removed again on every exit path (:func:`instrumented`), so after a
  capture — also one that raised — the module holds no nnsight state (:func:`is_instrumented`) and no
  hooks.

Entry points: :func:`capture_nnsight` (any callable that drives a Denoiser / U-Net:
``lambda: den(x, t, cond)``, ``lambda: interp.sample(den, ...)``) and :func:`capture_pipeline_nnsight`
(a saved diffusers pipeline run by ``DiffusionModel.generate``). :func:`interp.capture.capture_run`
switches between this backend and the hooks with ``backend=``.

Limitations (nnsight 0.8.1, measured here)
------------------------------------------
* Not a ``with`` block around arbitrary code: nnsight must *call* the code itself (``fn=`` of a trace),
  so this backend takes a callable, not a context.
* Labels are declared, not observed: a run whose calls do not follow the declared layout (e.g.
  ``den.predict(..., branch="uncond")`` under ``cfg=None``) is labelled by the declaration. The
  number of calls is verified; the branch names are not.
* Each site module must run exactly once per U-Net call (true for diffusers U-Nets); modules called
  several times per call or conditionally are refused after the run.
* ``DiffusionModel`` takes a *path* (a pipeline object is saved to a temporary folder and reloaded, which
  copies the weights), ``.trace()``/``.generate()`` default to ONE denoising step (so
  ``num_inference_steps`` is required here), and a traced run needs a prompt in a ``tracer.invoke``.
* nnsight is imported lazily (only by this module's functions): importing it mounts ``.save`` on every
  Python object and patches ``Tensor.backward`` for the rest of the process.
* ``tracer.iter[:]`` loops end by a warning when the run ends; those warnings are silenced here, other
  nnsight warnings are not.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from interp.capture import CallState, Capture, CfgShape, capture, unet_of
from interp.context import batched_cfg_branches
from interp.streams import pick_stream
from interp.site import Site

if TYPE_CHECKING:  # pragma: no cover - typing only; nnsight is imported lazily
    from nnsight.modeling.diffusion import DiffusionModel

Branches = tuple[tuple[str, slice], ...]

#: The keys nnsight 0.8 writes into an instrumented module's ``__dict__`` (the controller and its state).
_NNSIGHT_KEYS = ("forward", "__nnsight__")
#: The warning an open ``tracer.iter[:]`` loop ends with once the run is over (expected here).
_LOOP_END = re.compile(r".*was never reached: the loop asked for a step")


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class CallLayout:
    """How the U-Net calls of a run are labelled with a denoising step and CFG branches.

    Attributes:
        cfg: ``"batched"`` (each call's batch is ``[uncond; cond]`` halves), ``"separate"`` (calls
            alternate ``uncond``, ``cond``) or ``None`` (one ``cond`` branch per call).
        count_steps: label call ``k`` with step ``k`` (``k // 2`` for separate CFG); else step ``-1``.
        rows_per_branch: when known (a pipeline: prompts × images per prompt), the batch every call must
            have per branch — checked, so a layout mismatch raises instead of mislabelling.
        order: the branch order of a batched call (the family's: ``[uncond; cond]``, DiT ``[cond; uncond]``).
    """

    cfg: CfgShape = None
    count_steps: bool = False
    rows_per_branch: int | None = None
    order: tuple[str, str] = ("uncond", "cond")

    def __post_init__(self) -> None:
        if self.cfg not in ("batched", "separate", None):
            raise ValueError(f"cfg must be 'batched', 'separate' or None, got {self.cfg!r}")

    @property
    def calls_per_step(self) -> int:
        return 2 if self.cfg == "separate" else 1

    def label(self, call: int, batch: int) -> tuple[int, Branches]:
        """``(step, ((branch, rows), ...))`` of U-Net call ``call`` whose input batch is ``batch``."""
        if self.cfg == "batched":
            branches = batched_cfg_branches(batch, self.order)  # raises if the batch is not two equal halves
        elif self.cfg == "separate":
            branches = ((("uncond", "cond")[call % 2], slice(0, batch)),)
        else:
            branches = (("cond", slice(0, batch)),)
        if self.rows_per_branch is not None:
            rows = branches[0][1].stop - branches[0][1].start
            if rows != self.rows_per_branch:
                raise RuntimeError(
                    f"U-Net call {call} has batch {batch} = {len(branches)} branch(es) x {rows} rows, but the run "
                    f"was declared as {self.rows_per_branch} rows per branch (prompts x num_images_per_prompt)"
                )
        step = call // self.calls_per_step if self.count_steps else -1
        return step, branches


def layout_for(target: Any, cfg: CfgShape | str = "auto", count_steps: bool | None = None) -> CallLayout:
    """The default :class:`CallLayout` for ``target``.

    A :class:`~interp.Denoiser` with guidance on (scale not ``None``/1) uses its ``cfg_mode``; anything
    else has one ``cond`` branch. ``count_steps`` defaults to ``False`` (a single call, step ``-1``):
    pass ``True`` when ``run`` is a sampling loop.
    """
    from interp.denoiser import Denoiser

    if cfg == "auto":
        cfg = None
        if isinstance(target, Denoiser) and target.guidance_scale not in (None, 1.0):
            cfg = target.cfg_mode
    order = target.adapter.cfg_order if isinstance(target, Denoiser) else ("uncond", "cond")
    return CallLayout(cfg=cfg, count_steps=bool(count_steps), order=order)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- model state


def is_instrumented(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` still carries an nnsight controller in its ``__dict__``."""
    return any(_NNSIGHT_KEYS[1] in m.__dict__ for m in module.modules())


@contextlib.contextmanager
def instrumented(module: nn.Module) -> Iterator[Any]:
    """Wrap ``module`` in ``nnsight.NNsight`` for the block, and take nnsight's controllers out afterwards.

    nnsight 0.8 writes a controller into every submodule's ``__dict__`` (``forward`` and ``__nnsight__``)
    and leaves it there. This snapshots those two keys of every submodule first and restores them
    exactly on every exit path, so an instance ``forward`` set by someone else survives too.

    Yields:
        The root ``NNsight`` envoy.
    """
    import nnsight  # lazy: importing nnsight mounts `.save` on every object

    saved = [(m, {k: m.__dict__[k] for k in _NNSIGHT_KEYS if k in m.__dict__}) for m in module.modules()]
    try:
        yield nnsight.NNsight(module)
    finally:
        for m, before in saved:
            for key in _NNSIGHT_KEYS:
                if key in before:
                    m.__dict__[key] = before[key]
                else:
                    m.__dict__.pop(key, None)


def envoy_at(root: Any, path: str) -> Any:
    """The envoy of the module at dotted ``path`` below ``root``.

    nnsight moves a submodule whose name collides with one of its own attributes (``output``, ``input``,
    ``source``, ...) to ``E_<name>``; follow that rule instead of reading the live value by mistake.
    """
    import inspect

    from nnsight.intervention.envoy import Envoy

    envoy = root
    for part in path.split("."):
        name = f"{Envoy.OVERLOAD_PREFIX}{part}" if inspect.isdatadescriptor(getattr(Envoy, part, None)) else part
        envoy = getattr(envoy, name)
    return envoy


# --------------------------------------------------------------------------- recording


@dataclass
class _Recorder:
    """Receives values from the workers (inside the trace) and writes them into the capture's store."""

    cap: Capture
    layout: CallLayout
    call_base: int = 0
    calls_seen: int = 0
    visits: dict[str, int] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    def record(self, site: Site, path: str, call: int, value: Any, unet_inputs: tuple[tuple, dict]) -> None:
        """Store one module value of U-Net call ``call``; ``unet_inputs`` = that call's ``(args, kwargs)``."""
        args, kwargs = unet_inputs
        unet = self.cap._unet
        adapter = self.cap._adapter(unet)
        x = adapter.network_input(args, kwargs)
        # Dual-stream transformer blocks: the site's stream (image by default), as the torch hooks read it.
        streams = adapter.token_layout(unet, args, kwargs)
        batch = int(x.shape[0]) if isinstance(x, Tensor) else int(pick_stream(value, None, streams, path=path).shape[0])
        tensor = pick_stream(value, site.stream, streams, path=path) if site.io == "output" else value
        step, branches = self.layout.label(call, batch)
        # Call k of this run is numbered after any calls already in a store passed in (as the torch hooks do).
        index = self.call_base + call
        self.cap.record(site, path, tensor, CallState(index, step, branches, adapter.image_hw(unet, args, kwargs),
                                                      layout=streams))
        self.visits[path] = self.visits.get(path, 0) + 1

    def check(self, expected_calls: int | None) -> None:
        """Refuse a run whose calls did not match: declared count, or a module not seen once per call."""
        if self.calls_seen == 0:
            raise RuntimeError("the run made no U-Net call; nothing was captured")
        if expected_calls is not None and expected_calls != self.calls_seen:
            raise RuntimeError(
                f"calls={expected_calls} was declared but the run made {self.calls_seen} U-Net calls; "
                "pass the right number (steps x CFG calls per step) or calls=None"
            )
        odd = {p: n for p, n in self.visits.items() if n != self.calls_seen}
        missing = [p for _, p, _ in self.cap.resolved if p not in self.visits]
        if odd or missing:
            raise RuntimeError(
                f"the nnsight backend needs every site module to run once per U-Net call ({self.calls_seen} calls); "
                f"seen {odd or ''}{' never: ' + ', '.join(missing) if missing else ''}. Use the torch backend for it."
            )


def _count_calls(tracer: Any, unet: Any, recorder: _Recorder) -> None:
    """Worker: count the U-Net's calls (open loop; it ends when the run does)."""
    for _ in tracer.iter[:]:
        unet.output
        recorder.calls_seen += 1


def _read_site(tracer: Any, unet: Any, envoy: Any, site: Site, path: str, calls: int | None, recorder: _Recorder) -> None:
    """Worker: read one module at every U-Net call (occurrence k of its location = call k)."""
    for k in tracer.iter[:calls] if calls is not None else tracer.iter[:]:
        inputs = unet.inputs  # the call's (args, kwargs): batch and (H, W), as the torch hooks read them
        value = envoy.input if site.io == "input" else envoy.output
        recorder.record(site, path, k, value, inputs)


def _read_result(tracer: Any, recorder: _Recorder) -> None:
    """Worker: keep what the traced function returned."""
    recorder.result["value"] = tracer.result


def _prepare(cap: Capture, unet: nn.Module, layout: CallLayout) -> _Recorder:
    """Resolve sites, check the plan's budget and number calls, as :meth:`Capture.__enter__` does (no hooks)."""
    cap._begin(unet)
    return _Recorder(cap, layout, call_base=cap._next_call)


def _finish(cap: Capture, recorder: _Recorder, expected_calls: int | None, exc: BaseException | None) -> None:
    """Persist the store as the torch capture's exit does (aborted on an exception, closed if owned) after
    checking the run; an error in the check marks the store aborted too."""
    if exc is None:
        cap.calls = recorder.calls_seen
        cap._next_call = recorder.call_base + recorder.calls_seen
        try:
            recorder.check(expected_calls)
        except RuntimeError as err:
            cap._finish(err)
            raise
    cap._finish(exc)


@contextlib.contextmanager
def _loop_end_quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LOOP_END.pattern)
        yield


def capture_nnsight(
    target: Any,
    sites: Site | str | Iterable[Site | str],
    run: Callable[[], Any],
    *,
    calls: int | None = None,
    cfg: CfgShape | str = "auto",
    count_steps: bool | None = None,
    envoy: Any = None,
    **capture_kwargs: Any,
) -> tuple[Capture, Any]:
    """Capture ``sites`` while nnsight runs ``run()``; the store matches :func:`interp.capture.capture`'s.

    Args:
        target: a :class:`~interp.Denoiser` or the U-Net module that ``run`` drives.
        sites: :class:`~interp.Site` objects or path/glob strings.
        run: a callable making the U-Net calls, e.g. ``lambda: den(x, t, cond)`` or
            ``lambda: interp.sample(den, cond, shape=..., num_steps=3)``.
        calls: the number of U-Net calls ``run`` makes (bounds the step loop; checked). ``None``: loop
            until the run ends.
        cfg: CFG shape of the calls (see :class:`CallLayout`); ``"auto"`` reads a Denoiser's
            ``guidance_scale`` / ``cfg_mode``.
        count_steps: label call k with its denoising step (``True`` for sampling loops).
        envoy: an ``NNsight`` envoy of the same U-Net from an enclosing :func:`instrumented` block, to reuse
            across many captures (wrapping and unwrapping the ~460 modules of a U-Net costs about one
            forward pass); by default the U-Net is wrapped for this capture only.
        **capture_kwargs: ``store``, ``budget``, ``on_over_budget``, ``spill_dir``, ``store_dtype``,
            ``plan``, ``metadata`` — as for :func:`interp.capture.capture`.

    Returns:
        ``(capture, result)``: ``capture.store`` holds ``(B_branch, ...)`` CPU tensors keyed by
        ``ActivationKey(site, step, branch, call)``; ``result`` is what ``run`` returned.
    """
    layout = layout_for(target, cfg, count_steps)
    cap = capture(target, sites, cfg=layout.cfg, count_steps=layout.count_steps, **capture_kwargs)
    unet = unet_of(target)
    if envoy is not None and envoy._module is not unet:
        raise ValueError("envoy= must wrap the very U-Net that the capture's target runs")
    recorder = _prepare(cap, unet, layout)
    try:
        wrap = contextlib.nullcontext(envoy) if envoy is not None else instrumented(unet)
        with wrap as model, _loop_end_quiet():
            jobs = [(site, path, envoy_at(model, path)) for site, path, _ in cap.resolved]
            with model.trace(fn=run) as tracer:
                with tracer.invoke():
                    _count_calls(tracer, model, recorder)
                for site, path, envoy in jobs:
                    with tracer.invoke():
                        _read_site(tracer, model, envoy, site, path, calls, recorder)
                with tracer.invoke():
                    _read_result(tracer, recorder)
    except BaseException as err:
        _finish(cap, recorder, calls, err)
        raise
    _finish(cap, recorder, calls, None)
    return cap, recorder.result.get("value")


# --------------------------------------------------------------------------- pipelines


def load_diffusion_model(pipeline: Any, *, workdir: str | Path | None = None) -> DiffusionModel:
    """An nnsight ``DiffusionModel`` with real weights, from a saved pipeline folder or a pipeline object.

    ``DiffusionModel`` only loads from a path, so a pipeline object is saved (``save_pretrained``) into
    ``workdir`` (default: a temporary folder, deleted once loaded) and loaded back: a *copy* of the
    weights, realigned (:func:`interp.models.alignment.realign_pipeline_`) so that it computes exactly
    what the original computes.
    """
    from nnsight.modeling.diffusion import DiffusionModel

    if isinstance(pipeline, (str, Path)):
        model = DiffusionModel(str(pipeline), dispatch=True)
    elif workdir is not None:
        pipeline.save_pretrained(workdir)
        model = DiffusionModel(str(workdir), dispatch=True)
    else:
        with tempfile.TemporaryDirectory(prefix="scorescope-pipe-") as tmp:
            pipeline.save_pretrained(tmp)
            model = DiffusionModel(tmp, dispatch=True)
    # safetensors can leave weights at unaligned offsets, where CPU GEMMs round differently: realign so
    # the loaded copy computes bit for bit what the saved pipeline computes.
    from interp.models.alignment import realign_pipeline_

    realign_pipeline_(model.pipeline)
    model.pipeline.set_progress_bar_config(disable=True)
    return model


def capture_pipeline_nnsight(
    model: Any,
    sites: Site | str | Iterable[Site | str],
    prompt: str | list[str],
    *,
    num_inference_steps: int,
    guidance_scale: float = 5.0,
    num_images_per_prompt: int = 1,
    pipe_kwargs: dict[str, Any] | None = None,
    **capture_kwargs: Any,
) -> tuple[Capture, Any]:
    """Run a diffusers pipeline through nnsight's ``DiffusionModel.generate`` and capture ``sites`` of its U-Net.

    Every U-Net call is one denoising step (step = call index). With ``guidance_scale > 1`` the pipeline
    batches ``[uncond; cond]``; each call's batch must then be ``2 × len(prompts) × num_images_per_prompt``
    and is split into those halves.

    Args:
        model: a ``DiffusionModel``, a saved pipeline folder, or a pipeline object (saved to a temp folder).
        sites: sites of the pipeline's U-Net.
        prompt: one prompt or a list.
        num_inference_steps: denoising steps (required: nnsight's traced default is 1).
        guidance_scale: CFG scale passed to the pipeline.
        num_images_per_prompt: images per prompt.
        pipe_kwargs: further pipeline arguments (``generator``, ``output_type``, ``height``, ...).
        **capture_kwargs: as for :func:`interp.capture.capture` (``store``, ``budget``, ...).

    Returns:
        ``(capture, pipeline output)``.
    """
    from nnsight.modeling.diffusion import DiffusionModel

    def refuse_transformers(pipe: Any) -> None:
        if not isinstance(getattr(pipe, "unet", None), nn.Module):
            raise TypeError(
                f"capture_pipeline_nnsight runs U-Net pipelines; {type(pipe).__name__} has none. For PixArt, DiT, SD3 "
                "and Flux use capture_run(interp.Denoiser(pipe), sites, run, backend='nnsight', calls=N)"
            )

    if not isinstance(model, (DiffusionModel, str, Path)):
        refuse_transformers(model)  # before a pipeline object is saved and loaded
    if not isinstance(model, DiffusionModel):
        model = load_diffusion_model(model)
    pipe = model.pipeline
    refuse_transformers(pipe)
    prompts = 1 if isinstance(prompt, str) else len(prompt)
    guided = guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
    layout = CallLayout(cfg="batched" if guided else None, count_steps=True,
                        rows_per_branch=prompts * num_images_per_prompt)
    cap = capture(pipe, sites, cfg=layout.cfg, count_steps=True, **capture_kwargs)
    recorder = _prepare(cap, pipe.unet, layout)
    kwargs = dict(pipe_kwargs or {}, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  num_images_per_prompt=num_images_per_prompt)
    unet = model.unet
    jobs = [(site, path, envoy_at(unet, path)) for site, path, _ in cap.resolved]
    try:
        with _loop_end_quiet():
            with model.generate(**kwargs) as tracer:
                # The prompt's invoke defines the batch; its worker only counts U-Net calls.
                with tracer.invoke(prompt):
                    _count_calls(tracer, unet, recorder)
                for site, path, envoy in jobs:
                    with tracer.invoke():  # empty invoke: sees the whole [uncond; cond] batch, unsliced
                        _read_site(tracer, unet, envoy, site, path, num_inference_steps, recorder)
                with tracer.invoke():
                    _read_result(tracer, recorder)
    except BaseException as err:
        _finish(cap, recorder, num_inference_steps, err)
        raise
    _finish(cap, recorder, num_inference_steps, None)
    return cap, recorder.result.get("value")


__all__ = [
    "CallLayout",
    "capture_nnsight",
    "capture_pipeline_nnsight",
    "envoy_at",
    "instrumented",
    "is_instrumented",
    "layout_for",
    "load_diffusion_model",
]
