"""Capture: record activations at sites, per denoising step and per CFG branch.

Two ways to read activations:

* :func:`capture` — a context manager for bulk recording. Run anything inside it (a
  :class:`~interp.Denoiser` call, :func:`~interp.sample`, a whole diffusers pipeline) and every call of
  every resolved module is recorded into an :class:`~interp.store.ActivationStore`, keyed by site, step,
  branch and call. Steps and branches come from :mod:`interp.context` when a Denoiser or the sampling
  loop drives the U-Net; for a raw pipeline call the step comes from the pipeline's scheduler and the branches
  from the family's CFG layout, verified on the call (:meth:`interp.adapters.Adapter.pipeline_branches`), or
  from an explicit ``cfg="batched"`` (two halves) / ``cfg="separate"`` (alternating calls).
* :func:`read_activation` — a *differentiable* read ``read_activation(den, site, cond, x_t=..., t=...)``
  ``-> h_L`` that stops the forward right after the site. Probes use it inside ``torch.func`` transforms.

Every capture knows its byte cost before it runs when given a :class:`CapturePlan` (a shape-only pass
with fake tensors: no compute, no memory), and enforces a memory budget in any case: past it the capture
streams to safetensors shards on disk, or refuses with the number (``on_over_budget="raise"``).

Hooks are installed on module boundaries only and removed on every exit path.

Concurrency: a capture records only the forwards run in the thread (more exactly, the
:mod:`contextvars` context) that entered it — the active captures live in a context variable that the
hooks read — so two threads sampling one model under their own captures never see each other's calls.
(Forwards run by a thread started *inside* the block are therefore not recorded either: a new thread starts
with an empty context.)
Within one thread, a second capture of the same network while one is active (nested, or interleaved by
generators, which share their caller's context) is refused with :class:`CaptureConflictError`: its
forwards could not be told apart.
"""

from __future__ import annotations

import contextvars
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from interp.context import UNetCall, batched_cfg_branches, current_call
from interp.adapters import Adapter, adapter_for
from interp.hooks import HookSet
from interp.pipeline_calls import PipelineCalls, pipeline_of
from interp.site import Site, SiteError, as_sites, resolve_paths
from interp.streams import TokenLayout, pick_stream
from interp.store import DEFAULT_SHARD_BYTES, ActivationKey, ActivationStore, MemoryStore, ShardedStore
from interp.validation import format_bytes, parse_bytes

log = logging.getLogger(__name__)

CfgShape = Literal["batched", "separate"] | None


class CaptureBudgetError(MemoryError):
    """A capture would exceed its memory budget and was told not to stream to disk."""


class CaptureConflictError(RuntimeError):
    """A second capture of one network was entered in a thread/context where another is still active."""


class SiteSelectionError(ValueError):
    """A site's ``steps`` / ``branch`` selection matched none of the calls its modules ran (nothing captured)."""


#: The captures entered in the current thread / context. Hooks record only for these, so a capture never
#: records another thread's forwards (each thread has its own context).
_ACTIVE: contextvars.ContextVar[tuple[Capture, ...]] = contextvars.ContextVar("scorescope_active_captures", default=())


def unet_of(target: Any) -> nn.Module:
    """The network inside a Denoiser, a diffusers pipeline, or a bare module."""
    from interp.denoiser import Denoiser

    if isinstance(target, Denoiser):
        return target.unet
    if isinstance(target, nn.Module):
        return target
    unet = getattr(target, "unet", None) or getattr(target, "transformer", None)
    if isinstance(unet, nn.Module):
        return unet
    raise TypeError(f"cannot find a network in {type(target).__name__}; pass a Denoiser, a pipeline or an nn.Module")


def _batch_of(args: tuple, kwargs: dict) -> int:
    x = Adapter.network_input(args, kwargs)
    return int(x.shape[0]) if isinstance(x, Tensor) else 1


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class CapturePlan:
    """The byte cost of a capture, known before it runs.

    Attributes:
        per_call: ``{site_path: (shape, dtype, bytes)}`` for one U-Net call (all branches of the batch).
        calls: number of U-Net calls the run will make.
    """

    per_call: dict[str, tuple[tuple[int, ...], str, int]]
    calls: int

    @property
    def bytes_per_call(self) -> int:
        return sum(b for _, _, b in self.per_call.values())

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_call * self.calls

    def frame(self):
        """Tidy frame: one row per site with its per-call shape and total bytes."""
        import pandas as pd

        return pd.DataFrame(
            [{"site": s, "shape": shp, "dtype": dt, "bytes_per_call": b, "calls": self.calls, "total_bytes": b * self.calls}
             for s, (shp, dt, b) in self.per_call.items()]
        )

    def __str__(self) -> str:
        return (f"{len(self.per_call)} modules x {self.calls} calls = {format_bytes(self.total_bytes)} "
                f"({format_bytes(self.bytes_per_call)} per call)")


def plan_capture(
    target: Any,
    sites: Site | str | Iterable[Site | str],
    *,
    sample_shape: Sequence[int],
    tokens_shape: Sequence[int] | None = None,
    added: dict[str, Sequence[int]] | None = None,
    calls: int = 1,
    store_dtype: torch.dtype | None = None,
) -> CapturePlan:
    """Estimate a capture's bytes with one shape-only network pass on fake tensors (through the family's adapter).

    Args:
        target: Denoiser, pipeline or U-Net.
        sites: what will be captured.
        sample_shape: ``(B, C, H, W)`` of one U-Net call (``2B`` for batched CFG).
        tokens_shape: ``(B, L, D)`` of the conditioning tokens (default: the family's prompt length — 77 CLIP
            tokens; PixArt 120, SD3 77 + 256, Flux 512 T5 tokens, DiT one class token — and token width).
        added: shapes of the conditioning's ``added`` inputs without batch dim (SDXL: text_embeds, time_ids;
            SD3 / Flux: pooled_projections — the defaults).
        calls: number of U-Net calls (steps x separate CFG calls).
        store_dtype: dtype tensors will be stored in (default: the activations' own).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from interp.conditioning import ConditioningBatch
    from interp.denoiser import Denoiser

    unet = unet_of(target)
    adapter = target.adapter if isinstance(target, Denoiser) else adapter_for(unet)
    cfg = getattr(unet, "config", {}) or {}
    B = int(sample_shape[0])
    if tokens_shape is None:
        tokens_shape = (B, adapter.default_tokens, adapter.token_dim(cfg) or 768)
    if added is None and cfg.get("addition_embed_type") == "text_time":
        proj = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {"text_embeds": (proj,), "time_ids": (6,)}
    if added is None and cfg.get("pooled_projection_dim") is not None:  # SD3, Flux
        added = {"pooled_projections": (cfg["pooled_projection_dim"],)}
    resolved = [(s, p, m) for s in as_sites(sites) for p, m in s.resolve(unet)]
    shapes: dict[str, tuple[tuple[int, ...], str, int]] = {}
    layout: list[TokenLayout | None] = [None]  # of the call: dual-stream sites are sized by their stream

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        layout[0] = adapter.token_layout(module, args, kwargs)

    def recorder(path: str, site: Site) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            t = args[0] if site.io == "input" else pick_stream(out, site.stream, layout[0], path=path)
            dt = store_dtype or t.dtype
            shapes[path] = (tuple(t.shape), str(dt).removeprefix("torch."), t.numel() * torch.empty((), dtype=dt).element_size())

        return hook

    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    # Built outside the fake mode: a ConditioningBatch reads its mask's values once (its ``unpadded`` flag). Its
    # empty tokens are small and become fake tensors when the fake pass uses them.
    cb = ConditioningBatch(
        tokens=torch.empty(tuple(tokens_shape), device=device, dtype=dtype),
        mask=torch.ones(tuple(tokens_shape[:2]), dtype=torch.bool),
        added={k: torch.empty((B, *v), device=device, dtype=dtype) for k, v in (added or {}).items()},
    )
    with HookSet() as hooks, FakeTensorMode(allow_non_fake_inputs=True):
        hooks.pre(unet, on_call)
        for site, path, module in resolved:
            hooks.forward(module, recorder(path, site))
        # The call the Denoiser makes, through the family's adapter (keywords, packing, pooled projections).
        adapter.call(unet, torch.empty(tuple(sample_shape), device=device, dtype=dtype),
                     torch.tensor(1, device=device), cb, dtype)
    return CapturePlan(per_call=shapes, calls=int(calls))


# --------------------------------------------------------------------------- capture


def _fmt_steps(steps: list[int]) -> str:
    if steps == [-1]:
        return "none announced (-1: no sampling loop; pass count_steps=True or run interp.sample)"
    if len(steps) > 6 and steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}..{steps[-1]}"
    return str(steps)


@dataclass
class CallState:
    """Labels of one U-Net call: its index in the capture, step (``-1``: none), branch layout, input ``(H, W)``.

    ``runs`` counts how often each site module has run within this call.
    """

    index: int
    step: int
    branches: tuple[tuple[str, slice], ...]
    image_hw: tuple[int, int] | None
    runs: dict[str, int] = field(default_factory=dict)
    layout: TokenLayout | None = None  # image / text token counts of a transformer call (interp.streams)


@dataclass(eq=False)  # identity, not field equality: the active-capture registry compares captures with `is`
class Capture:
    """Records activations at sites while code runs inside ``with capture(...)``.

    Use :func:`capture` to build one. After the block, :attr:`store` holds the tensors (on CPU).

    Attributes:
        calls: U-Net calls that completed inside the block.
        failed_calls: call indices whose forward raised (their partial tensors stay in the store under
            that call index; a retry is a new call). Also saved as ``store.metadata["failed_calls"]``.
    """

    target: Any
    sites: list[Site]
    store: ActivationStore
    budget: int | None = None
    on_over_budget: Literal["stream", "raise"] = "stream"
    spill_dir: Path | None = None
    cfg: CfgShape = None
    count_steps: bool = False
    store_dtype: torch.dtype | None = None
    plan: CapturePlan | None = None
    owns_store: bool = False
    resolved: list[tuple[Site, str, nn.Module]] = field(default_factory=list)
    calls: int = 0
    failed_calls: list[int] = field(default_factory=list)
    _hooks: HookSet = field(default_factory=HookSet)
    _state: CallState | None = None
    _unet: nn.Module | None = None
    _next_call: int = 0  # index of the next call *started*: a retried forward gets a new one
    _ran: dict[int, set[tuple[int, str]]] = field(default_factory=dict)  # id(site) -> (step, branch) seen
    _hits: dict[int, int] = field(default_factory=dict)  # id(site) -> tensors recorded
    _family: Adapter | None = None
    _calls: PipelineCalls | None = None

    # ------------------------------------------------------------- lifecycle
    def _begin(self, unet: nn.Module) -> None:
        """Resolve sites, check the plan's budget, and number calls after those already in the store.

        Shared with the nnsight backend (which installs no hooks).
        """
        self._unet = unet
        self.resolved = [(s, p, m) for s in self.sites for p, m in s.resolve(unet)]
        by_path: dict[str, Site] = {}
        for site, path, _ in self.resolved:
            if path in by_path and by_path[path] is not site:
                raise ValueError(
                    f"module {path!r} is named by two sites ({by_path[path]!r} and {site!r}); their activations "
                    "would share one key: capture it once, or run two captures one after the other"
                )
            by_path[path] = site
        if self.plan is not None and self.budget is not None and self.plan.total_bytes > self.budget:
            self._over_budget(self.plan.total_bytes, before=True)
        # A store passed in may already hold an earlier capture: continue its call numbering so keys never collide.
        self._next_call = 1 + max((k.call for k in self.store.keys()), default=-1)

    def __enter__(self) -> Capture:
        unet = unet_of(self.target)
        active = _ACTIVE.get()
        clash = next((c for c in active if c._unet is unet), None)
        if clash is not None:
            raise CaptureConflictError(
                f"another capture of this {type(unet).__name__} (sites {[s.path for s in clash.sites]}) is already "
                "active in this thread; nested or interleaved captures of one model (e.g. two generators) cannot "
                "tell their forwards apart. Capture all sites in one capture(...), finish the first capture "
                "before starting the next, or run each capture in its own thread"
            )
        self._begin(unet)
        try:
            self._hooks.pre(unet, self._on_unet_call)
            self._hooks.forward(unet, self._on_unet_return)
            for site, path, module in self.resolved:
                if site.io == "input":
                    self._hooks.pre(module, self._reader(site, path, from_input=True))
                else:
                    self._hooks.forward(module, self._reader(site, path, from_input=False))
        except BaseException:
            self._hooks.remove()
            raise
        _ACTIVE.set((*active, self))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._hooks.remove()
        # Not ContextVar.reset(token): captures of different models may end in any order (generators).
        _ACTIVE.set(tuple(c for c in _ACTIVE.get() if c is not self))
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        """End the capture: persist the store (marked aborted when ``exc``), then check the site selections.

        A disk store this capture opened (from a folder, or by spilling) is closed; a store the caller
        passed in is flushed and stays open for them (an abort is still recorded on it, and written when
        they close it). The selection check runs last, on a clean exit only, so its error never costs the
        captured data.
        """
        if self._state is not None:  # a call whose forward raised and was not retried
            self._call_failed()
        if exc is not None:
            self.store.mark_aborted(f"{type(exc).__name__}: {exc}")
        if self.failed_calls:
            self.store.metadata["failed_calls"] = list(self.failed_calls)
        if self.owns_store:
            self.store.close()
        else:
            self.store.flush()
        if exc is None:
            self._check_selections()

    def _active(self) -> bool:
        return any(c is self for c in _ACTIVE.get())

    # ------------------------------------------------------------- hooks
    def _on_unet_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active():  # another thread's forward, or a forward outside the block
            return
        if self._state is not None:  # the previous call never returned: its forward raised
            self._call_failed()
        ctx: UNetCall | None = current_call()
        batch = _batch_of(args, kwargs)
        branches: tuple[tuple[str, slice], ...]
        # Step and CFG alternation count *completed* calls, so a retried forward gets the failed one's labels;
        # its call index (below) is new, so the two never collide in the store.
        calls = self._pipeline_calls(module)
        known = calls.step(args, kwargs) if calls is not None else None
        if ctx is not None and ctx.step is not None:
            step = ctx.step
        elif self.count_steps:
            # A pipeline's scheduler says which step this is (Heun calls twice per step); else count calls.
            step = known if known is not None else self.calls // (2 if self._cfg_shape() == "separate" else 1)
        else:
            step = -1
        if ctx is not None and ctx.branches:
            branches = ctx.branches
        elif self.cfg is None and calls is not None:
            branches = calls.branches(args, kwargs, known)  # the family's own layout, verified on the call
        elif self._cfg_shape() == "batched":
            branches = batched_cfg_branches(batch, self._adapter(module).cfg_order)  # the family's order (DiT: cond first)
        elif self._cfg_shape() == "separate":
            branches = ((("uncond", "cond")[self.calls % 2], slice(0, batch)),)
        else:
            branches = (("cond", slice(0, batch)),)
        adapter = self._adapter(module)
        self._state = CallState(self._take_call_index(), step, branches, adapter.image_hw(module, args, kwargs),
                                layout=adapter.token_layout(module, args, kwargs))

    def _on_unet_return(self, module: nn.Module, args: tuple, out: Any) -> None:
        if not self._active():
            return
        self.calls += 1
        self._state = None

    def _take_call_index(self) -> int:
        index = self._next_call
        self._next_call += 1
        return index

    def _call_failed(self) -> None:
        assert self._state is not None
        self.failed_calls.append(self._state.index)
        log.warning("U-Net call %d raised inside the capture; its partial tensors stay under call=%d",
                    self._state.index, self._state.index)
        self._state = None

    def _adapter(self, module: nn.Module) -> Adapter:
        """The family adapter of the network (the Denoiser's own, else chosen from the class; built once)."""
        if self._family is None:
            from interp.denoiser import Denoiser

            self._family = self.target.adapter if isinstance(self.target, Denoiser) else adapter_for(module)
        return self._family

    def _pipeline_calls(self, module: nn.Module) -> PipelineCalls | None:
        """The labeller of a raw pipeline run's calls (``None`` unless the target is a pipeline; built once)."""
        if self._calls is None and pipeline_of(self.target) is not None:
            self._calls = PipelineCalls(self.target, self._adapter(module))
        return self._calls

    def _cfg_shape(self) -> CfgShape:
        if self.cfg is not None:
            return self.cfg
        # A diffusers pipeline running classic CFG batches [uncond; cond] in one call.
        if getattr(self.target, "do_classifier_free_guidance", False) and not isinstance(self.target, nn.Module):
            return "batched"
        return None

    def _reader(self, site: Site, path: str, *, from_input: bool) -> Callable:
        def read(tensor: Tensor) -> None:
            if not self._active():
                return
            state = self._state
            if state is None:  # the module ran outside a U-Net call (e.g. a direct submodule call): its own call
                state = CallState(self._take_call_index(), -1, (("cond", slice(0, tensor.shape[0])),), None)
            self.record(site, path, tensor, state)

        if from_input:
            return lambda module, args, kwargs: read(args[0] if args else next(iter(kwargs.values())))

        def read_output(module: nn.Module, args: tuple, out: Any) -> None:
            if self._active():  # the stream check reads the call's layout, so only inside this capture's calls
                layout = self._state.layout if self._state is not None else None
                read(pick_stream(out, site.stream, layout, path=path))

        return read_output

    def record(self, site: Site, path: str, tensor: Tensor, state: CallState) -> None:
        """Store each applicable branch of one module activation ``(B_call, ...)`` as a ``(B_branch, ...)`` copy.

        Shared by both backends (torch hooks here, :mod:`interp.nnsight_backend`), so the selection,
        dtype and copy semantics — hence the stored bits — cannot drift apart.
        """
        # A module that runs more than once in one call (diffusers resnets share one `nonlinearity`) keeps
        # every run: run k >= 1 is stored under site "path#k" instead of colliding with run 0's key.
        run = state.runs.get(path, 0)
        state.runs[path] = run + 1
        name = path if run == 0 else f"{path}#{run}"
        ran = self._ran.setdefault(id(site), set())
        for branch, rows in state.branches:
            ran.add((state.step, branch))
            if not site.applies(None if state.step < 0 else state.step, branch):
                continue
            self._hits[id(site)] = self._hits.get(id(site), 0) + 1
            part = site.select(tensor[rows], state.image_hw).detach()
            if self.store_dtype is not None:
                part = part.to(self.store_dtype)
            # Always a copy: the model may reuse or modify its buffers after the hook returns. A disk store takes
            # a CUDA tensor itself and copies it into pinned memory without blocking (ordered on the stream).
            if part.device.type == "cuda" and isinstance(self.store, ShardedStore):
                part = part.contiguous()
            elif part.device.type != "cpu":
                part = part.to("cpu", copy=True).contiguous()
            else:
                part = part.clone()
            self._put(ActivationKey(name, state.step, branch, state.index), part)

    def _check_selections(self) -> None:
        """Refuse a site whose explicit ``steps``/``branch`` matched none of the calls that ran; warn about
        listed steps that never ran. Sites whose modules never ran are not judged (nothing to select from)."""
        for site in self.sites:
            ran = self._ran.get(id(site))
            if not site.selective or not ran:
                continue
            steps_ran = sorted({s for s, _ in ran})
            branches_ran = sorted({b for _, b in ran})
            if not self._hits.get(id(site)):
                raise SiteSelectionError(
                    f"Site({site.path!r}, steps={site.steps!r}, branch={site.branch!r}) matched none of the calls "
                    f"that ran: steps {_fmt_steps(steps_ran)}, branches {branches_ran}; nothing was captured for "
                    "it (everything else is in cap.store). Pick steps/branches that the run makes"
                )
            if isinstance(site.steps, (int, tuple, range)):
                wanted = [site.steps] if isinstance(site.steps, int) else list(site.steps)
                missing = [s for s in wanted if s not in set(steps_ran)]
                if missing:
                    warnings.warn(
                        f"Site({site.path!r}) asked for steps {missing[:10]} that did not run (steps that ran: "
                        f"{_fmt_steps(steps_ran)}); those were not captured",
                        UserWarning,
                        stacklevel=3,
                    )

    # ------------------------------------------------------------- budget
    def _put(self, key: ActivationKey, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        # A disk store's RAM is bounded by its shard size; only a memory store can outgrow the budget.
        if self.budget is not None and isinstance(self.store, MemoryStore) and self.store.nbytes + nbytes > self.budget:
            self._over_budget(self.store.nbytes + nbytes, before=False)
        self.store.put(key, tensor)

    def _over_budget(self, needed: int, *, before: bool) -> None:
        if not isinstance(self.store, MemoryStore):
            return
        what = "would need" if before else "has reached"
        msg = f"capture {what} {format_bytes(needed)}, over its memory budget of {format_bytes(self.budget or 0)}"
        if self.on_over_budget == "raise":
            raise CaptureBudgetError(
                msg + "; raise budget=, capture fewer sites/steps, or pass on_over_budget='stream' to write to disk"
            )
        root = self.spill_dir or Path(tempfile.mkdtemp(prefix="scorescope-capture-"))
        log.warning("%s; streaming to %s", msg, root)
        disk = ShardedStore(root, metadata=self.store.metadata, background=True,
                            shard_bytes=min(self.budget or DEFAULT_SHARD_BYTES, DEFAULT_SHARD_BYTES))
        for k, t in self.store.items():
            disk.put(k, t)
        self.store = disk
        self.owns_store = True

    # ------------------------------------------------------------- results
    def frame(self):
        """Tidy frame of what was captured (see :meth:`ActivationStore.frame`)."""
        return self.store.frame()


def _check_budget(budget: int | float | str | None) -> int | None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str, type(None))):
        raise TypeError(f"budget must be bytes (int), a size such as '4GiB', or None; got {budget!r}")
    return parse_bytes(budget, "budget")  # refuses zero, negative, non-finite and unparsable sizes, naming budget


def _check_store_dtype(store_dtype: Any) -> torch.dtype | None:
    if store_dtype is None:
        return None
    if not isinstance(store_dtype, torch.dtype):
        raise TypeError(f"store_dtype must be a torch floating dtype such as torch.float16, got {store_dtype!r}")
    if not store_dtype.is_floating_point:
        # An integer (or bool, complex) copy would truncate activations silently.
        raise ValueError(f"store_dtype={store_dtype} is not a real floating dtype; pass torch.float16, "
                         "torch.bfloat16 or torch.float32 (or None to keep the activations' own dtype)")
    return store_dtype


def capture(
    target: Any,
    sites: Site | str | Iterable[Site | str],
    *,
    store: Literal["memory"] | str | Path | ActivationStore = "memory",
    budget: int | str | None = "4GiB",
    on_over_budget: Literal["stream", "raise"] = "stream",
    spill_dir: str | Path | None = None,
    cfg: CfgShape = None,
    count_steps: bool | None = None,
    store_dtype: torch.dtype | None = None,
    plan: CapturePlan | None = None,
    metadata: dict[str, Any] | None = None,
) -> Capture:
    """Record activations at ``sites`` for everything run inside the returned context manager.

    Only forwards run in the thread (context) that entered the block are recorded; a second capture of
    the same network inside the block is refused (:class:`CaptureConflictError`).

    Args:
        target: a :class:`~interp.Denoiser`, a diffusers pipeline, or the U-Net module itself.
        sites: :class:`~interp.Site` objects or path/glob strings (``"*.attn2"``).
        store: ``"memory"``, a folder to stream safetensors shards into (16 MiB shards written by a background
            thread, :class:`~interp.store.ShardedStore` with ``background=True``), or an ActivationStore.
        budget: memory budget for captured tensors (bytes > 0 or ``"4GiB"``); ``None`` for no limit.
        on_over_budget: ``"stream"`` spills to disk (``spill_dir`` or a temp folder); ``"raise"`` refuses.
        cfg: CFG shape of calls not announced by a Denoiser (raw pipeline / U-Net calls):
            ``"batched"`` = two halves in the family's order (``[uncond; cond]``; DiT ``[cond; uncond]``),
            ``"separate"`` = alternating calls, ``None`` = auto (a pipeline: the family's own layout, verified on
            each call, see :meth:`interp.adapters.Adapter.pipeline_branches`; else one ``cond`` branch).
        count_steps: number unannounced calls as steps (default: True for pipelines, whose scheduler says the step).
        store_dtype: store activations in this floating dtype (e.g. ``torch.float16`` to halve the bytes).
        plan: a :func:`plan_capture` estimate: the budget is then checked *before* anything runs.
        metadata: saved with the store (model, seed, ...).

    Returns:
        A :class:`Capture`; after the ``with`` block, ``cap.store`` holds ``(B, ...)`` CPU tensors keyed by
        :class:`~interp.store.ActivationKey` (site, step, branch, call). If the block raised, the store
        keeps what was captured and is marked partial (``store.complete`` False, ``store.aborted``).

    Raises:
        ValueError / TypeError: a bad argument (named in the message), before anything runs.
        SiteSelectionError: on leaving the block, when a site's ``steps``/``branch`` matched no call that ran
            (raised after the store is saved, so nothing captured is lost).
    """
    from interp.metadata import version

    if on_over_budget not in ("stream", "raise"):
        raise ValueError(f"on_over_budget must be 'stream' (spill to disk) or 'raise', got {on_over_budget!r}")
    if cfg not in ("batched", "separate", None):
        raise ValueError(f"cfg must be 'batched', 'separate' or None (auto), got {cfg!r}")
    if count_steps is not None and not isinstance(count_steps, bool):
        raise TypeError(f"count_steps must be True, False or None (auto), got {count_steps!r}")
    if plan is not None and not isinstance(plan, CapturePlan):
        raise TypeError(f"plan must be a CapturePlan from plan_capture(...), got {type(plan).__name__}")
    if not isinstance(store, (ActivationStore, str, Path)):
        raise TypeError(f"store must be 'memory', a folder path or an ActivationStore, got {type(store).__name__}")
    nbytes = _check_budget(budget)
    store_dtype = _check_store_dtype(store_dtype)
    site_list = as_sites(sites)
    meta = {"scorescope_version": version(), **(metadata or {})}
    if hasattr(target, "metadata") and callable(target.metadata):
        meta = {**target.metadata(), **meta}
    meta["sites"] = [s.path for s in site_list]
    if isinstance(store, ActivationStore):
        st = store
    elif store == "memory":
        st = MemoryStore(metadata=meta)
    else:
        st = ShardedStore(Path(store), metadata=meta, background=True)  # shards written off the sampling thread
    if count_steps is None:
        count_steps = not isinstance(target, nn.Module) and not hasattr(target, "predict")
    return Capture(
        target=target,
        sites=site_list,
        store=st,
        budget=nbytes,
        on_over_budget=on_over_budget,
        spill_dir=Path(spill_dir) if spill_dir else None,
        cfg=cfg,
        count_steps=count_steps,
        store_dtype=store_dtype,
        plan=plan,
        owns_store=not isinstance(store, ActivationStore),
    )


Backend = Literal["torch", "nnsight"]


def capture_run(
    target: Any,
    sites: Site | str | Iterable[Site | str],
    run: Callable[[], Any],
    *,
    backend: Backend = "torch",
    calls: int | None = None,
    **kwargs: Any,
) -> tuple[Capture, Any]:
    """Run ``run()`` while capturing ``sites`` with either backend; returns ``(capture, run's result)``.

    ``backend="torch"`` is ``with capture(target, sites, **kwargs): run()`` (plain forward hooks, the
    default). ``backend="nnsight"`` runs ``run`` as the function of an nnsight trace
    (:func:`interp.nnsight_backend.capture_nnsight`; nnsight is imported only then). Both fill the same
    :class:`~interp.store.ActivationStore` format. The nnsight backend cannot read the step/branch that a
    Denoiser announces, so pass ``cfg=`` / ``count_steps=`` that describe the run (see that function);
    ``calls`` (the number of U-Net calls ``run`` makes) bounds its step loop and is checked. Note that
    ``cfg=None`` means "auto" to the torch backend but "no CFG" to the nnsight one (whose auto is
    ``cfg="auto"``, its default).
    """
    if backend == "torch":
        with capture(target, sites, **kwargs) as cap:
            result = run()
        return cap, result
    if backend == "nnsight":
        from interp.nnsight_backend import capture_nnsight

        return capture_nnsight(target, sites, run, calls=calls, **kwargs)
    raise ValueError(f"backend must be 'torch' or 'nnsight', got {backend!r}")


# --------------------------------------------------------------------------- differentiable reads


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once every wanted activation has been read."""


_NEW_CALL = "{fn}(den, {site}, cond, x_t=x_t, timestep=t)"


def _read_args(
    fn: str, site: str, cond: Any, legacy: tuple[Any, ...], x_t: Tensor | None, t: Any, timestep: Any
) -> tuple[Any, Tensor, Any, Any]:
    """``(cond, x_t, t, timestep)`` of a read call, accepting the deprecated ``(x_t, t, cond)`` positional order.

    The old call ``fn(den, site, x_t, t, cond)`` took ``t`` as the raw scheduler timestep; it is recognised by a
    Tensor in the ``cond`` position followed by two more positional arguments.
    """
    if isinstance(cond, Tensor):
        if len(legacy) != 2 or x_t is not None or t is not None or timestep is not None:
            raise TypeError(
                f"{fn}: cond must be a Conditioning, got a Tensor; call {_NEW_CALL.format(fn=fn, site=site)} "
                "(or t= for a noise fraction in [0, 1])"
            )
        warnings.warn(
            f"{fn}(den, {site}, x_t, t, cond) is deprecated (its t was the raw scheduler timestep); call "
            f"{_NEW_CALL.format(fn=fn, site=site)}, or t= with a noise fraction in [0, 1]",
            DeprecationWarning,
            stacklevel=3,
        )
        x_t, timestep, cond = cond, legacy[0], legacy[1]
        return cond, x_t, None, timestep
    if legacy:
        raise TypeError(f"{fn} takes (den, {site}, cond) positionally and x_t=, t= or timestep= by keyword; "
                        f"got {len(legacy)} extra positional argument(s)")
    if x_t is None:
        raise TypeError(f"{fn} needs x_t= (the noisy input, (B, C, H, W)); call {_NEW_CALL.format(fn=fn, site=site)}")
    return cond, x_t, t, timestep


def read_activations(
    den: Any,
    sites: Sequence[str],
    cond: Any = None,
    *legacy: Any,
    x_t: Tensor | None = None,
    t: float | None = None,
    timestep: Tensor | float | int | None = None,
    branch: Literal["cond", "uncond"] = "cond",
    stop_early: bool = True,
) -> dict[str, Tensor]:
    """Differentiable activations ``{path: (B, ...)}`` at exact module paths for one Denoiser call.

    Nothing is detached, so this composes with ``torch.autograd`` and ``torch.func`` (vjp, jvp, vmap). With
    ``stop_early`` the forward pass ends right after the last wanted module runs.

    Args:
        den: the Denoiser.
        sites: exact module paths (a glob must match exactly one module).
        cond: the conditioning of the call.
        x_t: noisy input ``(B, C, H, W)``.
        t: noise fraction in ``[0, 1]``, or
        timestep: the scheduler's training timestep (exactly one of ``t`` / ``timestep``).
        branch: CFG branch the call is labelled with (``"cond"`` / ``"uncond"``).

    The old positional form ``read_activations(den, sites, x_t, timestep, cond)`` still works for one release,
    with a ``DeprecationWarning``.
    """
    from interp.inputs import resolve_timestep

    cond, x_t, t, timestep = _read_args("read_activations", "sites", cond, legacy, x_t, t, timestep)
    return _read(den, sites, cond, x_t, resolve_timestep(den, t=t, timestep=timestep), branch, stop_early)


def _read(den: Any, sites: Sequence[str], cond: Any, x_t: Tensor, ts: Tensor, branch: str, stop_early: bool) -> dict[str, Tensor]:
    if isinstance(sites, str):
        raise TypeError(f"sites must be a list of module paths, got the string {sites!r}; pass [{sites!r}]")
    if branch not in ("cond", "uncond"):
        raise ValueError(f"branch must be 'cond' or 'uncond' (a U-Net call's branch), got {branch!r}")
    unet = unet_of(den)
    modules: dict[str, nn.Module] = {}
    for pattern in sites:
        hits = resolve_paths(unet, pattern)
        if len(hits) != 1:
            names = ", ".join(p for p, _ in hits[:6])
            raise SiteError(f"{pattern!r} matches {len(hits)} modules ({names}...); read_activation needs exact paths")
        modules[hits[0][0]] = hits[0][1]
    box: dict[str, Tensor] = {}
    layout: list[TokenLayout | None] = [None]  # of the network call: dual-stream outputs read their image stream

    adapter = getattr(den, "adapter", None)

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        layout[0] = adapter.token_layout(module, args, kwargs) if adapter is not None else None

    def hook_for(path: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            box[path] = pick_stream(out, None, layout[0], path=path)
            if stop_early and len(box) == len(modules):
                raise _StopForward

        return hook

    with HookSet() as hooks:
        hooks.pre(unet, on_call)
        for path, module in modules.items():
            hooks.forward(module, hook_for(path))
        try:
            den.predict(x_t, ts, cond, branch=branch)
        except _StopForward:
            pass
    missing = [p for p in modules if p not in box]
    if missing:
        raise RuntimeError(f"modules {missing} did not run during the forward pass")
    return box


def read_activation(
    den: Any,
    site: str,
    cond: Any = None,
    *legacy: Any,
    x_t: Tensor | None = None,
    t: float | None = None,
    timestep: Tensor | float | int | None = None,
    branch: Literal["cond", "uncond"] = "cond",
) -> Tensor:
    """The differentiable output ``(B, ...)`` of the one module at ``site`` (see :func:`read_activations`).

    ``read_activation(den, site, cond, x_t=x_t, t=0.5)`` (noise fraction) or ``..., timestep=500)``. The old
    ``read_activation(den, site, x_t, timestep, cond)`` still works for one release, with a ``DeprecationWarning``.
    """
    from interp.inputs import resolve_timestep

    cond, x_t, t, timestep = _read_args("read_activation", "site", cond, legacy, x_t, t, timestep)
    ts = resolve_timestep(den, t=t, timestep=timestep)
    return next(iter(_read(den, [site], cond, x_t, ts, branch, True).values()))
