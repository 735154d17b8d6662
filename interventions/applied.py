"""``apply(target, *edits)``: install edits on a model for the duration of a ``with`` block, restorably.

Everything goes through ONE :class:`interp.hooks.HookSet` — a U-Net forward-pre hook that reads the call's
step, branch layout and row conditionings (and appends Compose's auxiliary rows), forward hooks at the
edited sites, a U-Net forward hook (composition/patching of the output, dropping auxiliary rows) and
attention-processor swaps — and is undone on every exit path (normal, exception, ``KeyboardInterrupt``,
generator closed; tested in ``tests/test_hook_hygiene.py``).

Concurrency follows :mod:`interp.capture`: an ``apply`` block edits only the forwards of the thread/context
that entered it (hooks of another thread's forwards pass through; swapped processors delegate unchanged).
Two live blocks on one model may edit different modules; editing the same module twice, or two live
Compose edits (both would expand the batch), is refused with :class:`EditConflictError`.
"""

from __future__ import annotations

import contextvars
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from interp.adapters import Adapter, adapter_for
from interp.capture import unet_of
from interp.context import current_call
from interp.hooks import HookSet, primary_tensor, replace_primary
from interp.pipeline_calls import PipelineCalls, pipeline_of
from interp.site import resolve_paths, spatial_view
from interp.streams import TokenLayout, pick_stream, replace_stream

from interventions.compose import Expansion, compose_rows, expand_inputs, plan_expansion
from interventions.edits import OUTPUT, Compose, Edit, MaskCrossAttention, Patch
from interventions.masking import MASKED, DistanceMaskedProcessor, hidden_tokens, is_cross_attention, layer_grid
from interventions.sources import CallInfo


_DIAGONAL = math.sqrt(2.0)  # the diagonal of the normalised image [0, 1]^2, whatever its aspect ratio


class EditConflictError(RuntimeError):
    """Two live edits would change the same module (or both expand the batch)."""


_ACTIVE: contextvars.ContextVar[tuple[Applied, ...]] = contextvars.ContextVar("scorescope_active_edits", default=())
# module -> the live Applied editing it ("expand" key: the U-Net of a live Compose).
_EDITED: weakref.WeakKeyDictionary[nn.Module, dict[str, Applied]] = weakref.WeakKeyDictionary()


@dataclass
class _Call:
    """State of the U-Net call being run: labels of its rows and per-call caches."""

    step: int | None
    timestep: float | None
    branches: tuple[tuple[str, slice], ...]
    conditionings: tuple[Any, ...]  # per original row (empty when not announced)
    image_hw: tuple[int, int] | None
    batch: int
    layout: TokenLayout | None = None  # image / text token counts of a transformer call (interp.streams)
    expansion: Expansion | None = None
    cache: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.expansion.rows if self.expansion else self.batch

    def row_branch(self) -> list[str | None]:
        """Branch of every row of the (expanded) batch; auxiliary rows inherit their parent's."""
        out: list[str | None] = [None] * self.batch
        for name, sl in self.branches:
            for r in range(*sl.indices(self.batch)):
                out[r] = name
        if self.expansion:
            out += [out[p] for p in self.expansion.parents]
        return out

    def row_conditionings(self) -> list[Any]:
        conds = list(self.conditionings) if self.conditionings else [None] * self.batch
        if self.expansion:
            conds += self.expansion.conditionings
        return conds


def _rows_of(sl: slice, batch: int) -> list[int]:
    return list(range(*sl.indices(batch)))


def _write(rows: Tensor, value: Tensor, edit: Patch, image_hw: tuple[int, int] | None, site: str) -> Tensor:
    """``rows`` (one branch, ``(b, ...)``) with the Patch's selection replaced by ``value``.

    ``value`` is full-sized (``(b, ...)`` or ``(1, ...)``), or — with a region/channels — the shape
    ``Site.select`` gives the selected part (a token sequence with a region is then ``(b, C', h', w')``).
    """
    value = value.to(device=rows.device, dtype=rows.dtype)
    batch_ok = value.dim() == rows.dim() and value.shape[0] in (1, rows.shape[0])
    if edit.region is None and edit.channels is None:
        if batch_ok and value.shape[1:] == rows.shape[1:]:
            return value.expand_as(rows).clone()
        raise ValueError(f"Patch at {site!r}: the source has shape {tuple(value.shape)} but the activation "
                         f"(one branch's rows) has shape {tuple(rows.shape)}")
    sel = edit.site(site)
    part_shape = sel.select(rows, image_hw).shape
    if batch_ok and value.shape[1:] == rows.shape[1:]:
        value = sel.select(value.expand_as(rows), image_hw)  # a full-size source: take its selected part
    elif not (value.shape[0] in (1, rows.shape[0]) and value.shape[1:] == part_shape[1:]):
        raise ValueError(f"Patch at {site!r}: the source has shape {tuple(value.shape)} but the activation (one "
                         f"branch's rows) has shape {tuple(rows.shape)} and its selected region/channels "
                         f"{tuple(part_shape)}")
    value = value.expand(part_shape)
    tokens = rows.dim() == 3
    # A token sequence with a region is edited on its spatial (b, C, h, w) copy, where rows and columns exist.
    work = spatial_view(rows, image_hw).clone() if (tokens and edit.region is not None) else rows.clone()
    ch = edit.channels
    ch_idx: Any = slice(None) if ch is None else (ch if isinstance(ch, slice) else torch.tensor(list(ch), device=rows.device))
    if work.dim() == 4:
        rs = cs = slice(None)
        if edit.region is not None:
            h, w = work.shape[-2:]
            y0, y1, x0, x1 = edit.region  # the same cells as Site.select
            rs = slice(math.floor(y0 * h), max(math.ceil(y1 * h), math.floor(y0 * h) + 1))
            cs = slice(math.floor(x0 * w), max(math.ceil(x1 * w), math.floor(x0 * w) + 1))
        work[:, ch_idx, rs, cs] = value
    else:
        work[:, :, ch_idx] = value
    if tokens and edit.region is not None:
        return work.flatten(2).transpose(1, 2).contiguous()
    return work


class Applied:
    """A live set of edits on one network (use :func:`apply`).

    Attributes:
        edits: the edits, in order.
        sites: ``[(edit index, path)]`` every edit resolved to (``"output"``: the U-Net's output).
    """

    def __init__(self, target: Any, edits: list[Edit]) -> None:
        self.target = target
        self.edits = edits
        self.unet: nn.Module = unet_of(target)
        self._family: Adapter | None = None
        self._pipeline_calls: PipelineCalls | None = None
        self.sites: list[tuple[int, str]] = []
        self._resolved: list[tuple[int, str, nn.Module]] = []
        self._hooks = HookSet()
        self._call: _Call | None = None
        self._cache: dict = {}
        self._fired: dict[tuple[int, str, int, str], list[int]] = {}
        self._claimed: list[tuple[nn.Module, str]] = []

    # ------------------------------------------------------------------ resolve
    def _resolve(self) -> None:
        for i, edit in enumerate(self.edits):
            for pattern in edit.sites:
                if pattern == OUTPUT:
                    if isinstance(edit, MaskCrossAttention):
                        raise ValueError("MaskCrossAttention cannot edit 'output' (not a cross-attention module); "
                                         "select attention modules such as '*attn2'")
                    hits = [(OUTPUT, self.unet)]
                else:
                    hits = resolve_paths(self.unet, pattern)
                if isinstance(edit, MaskCrossAttention):
                    bad = [p for p, m in hits if not is_cross_attention(m)]
                    if bad:
                        inner = [p for p, m in self.unet.named_modules() if is_cross_attention(m)
                                 and any(p.startswith(b + ".") for b in bad)]
                        hint = f"; cross-attention modules inside: {inner[:6]}" if inner else "; e.g. '*attn2'"
                        raise ValueError(f"MaskCrossAttention({pattern!r}) selects modules that are not cross-attention "
                                         f"Attention modules: {bad[:6]}{hint}")
                for path, module in hits:
                    if any(j == i and p == path for j, p, _ in self._resolved):
                        continue
                    self._resolved.append((i, path, module))
                    self.sites.append((i, path))
        masked: dict[str, int] = {}
        for i, path, _ in self._resolved:
            if isinstance(self.edits[i], MaskCrossAttention):
                if path in masked:
                    raise ValueError(f"MaskCrossAttention edits {masked[path]} and {i} both select {path!r}; "
                                     "one processor per module: use one edit")
                masked[path] = i
        for i, edit in enumerate(self.edits):
            if isinstance(edit, Patch):
                edit.source.check([p for j, p, _ in self._resolved if j == i], self._cache)

    def _claim(self) -> None:
        wanted: list[tuple[nn.Module, str]] = [(m, "module") for _, _, m in self._resolved]
        if any(isinstance(e, Compose) for e in self.edits):
            wanted.append((self.unet, "expand"))
        for module, what in wanted:
            owner = _EDITED.get(module, {}).get(what)
            if owner is not None and owner is not self:
                name = next((p for _, p, m in self._resolved if m is module), type(module).__name__)
                raise EditConflictError(
                    f"{'a Compose edit' if what == 'expand' else repr(name)} is already edited by another live "
                    "interventions.apply block on this model; put both edits in one apply(...), or finish the first block"
                )
        for module, what in wanted:
            _EDITED.setdefault(module, {})[what] = self
            self._claimed.append((module, what))

    def _release(self) -> None:
        for module, what in self._claimed:
            entry = _EDITED.get(module)
            if entry is not None and entry.get(what) is self:
                del entry[what]
                if not entry:
                    del _EDITED[module]
        self._claimed = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Applied:
        self._resolve()
        self._claim()
        try:
            self._hooks.pre(self.unet, self._on_call)
            for i, path, module in self._resolved:
                edit = self.edits[i]
                if isinstance(edit, MaskCrossAttention):
                    proc = DistanceMaskedProcessor(module.processor, self._bias_fn(i, path))
                    self._hooks.swap_processor(module, proc)
                elif path != OUTPUT:
                    self._hooks.forward(module, self._site_hook(i, path))
            self._hooks.forward(self.unet, self._on_return)
        except BaseException:
            self._hooks.remove()
            self._release()
            raise
        _ACTIVE.set((*_ACTIVE.get(), self))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._hooks.remove()
        finally:
            _ACTIVE.set(tuple(a for a in _ACTIVE.get() if a is not self))
            self._release()
            self._call = None

    def _active(self) -> bool:
        return any(a is self for a in _ACTIVE.get())

    # ------------------------------------------------------------------ hooks
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        self._call = None
        if not self._active():
            return None
        adapter = self._adapter(module)
        x = adapter.network_input(args, kwargs)
        if not isinstance(x, Tensor):
            return None
        batch = int(x.shape[0])
        ctx = current_call()
        branches = ctx.branch_slices(batch) if ctx else (("cond", slice(0, batch)),)
        step = ctx.step if ctx else None
        if (ctx is None or not ctx.branches) and pipeline_of(self.target) is not None:
            # A family's own pipeline announces nothing: its scheduler and CFG layout say (interp.pipeline_calls).
            if self._pipeline_calls is None:
                self._pipeline_calls = PipelineCalls(self.target, adapter)
            known = self._pipeline_calls.step(args, kwargs)
            step = step if step is not None else known
            branches = self._pipeline_calls.branches(args, kwargs, known)
        conds = ctx.conditionings if ctx else ()
        if conds and len(conds) != batch:
            raise ValueError(f"the U-Net call has {batch} rows but {len(conds)} announced conditionings; is a Compose "
                             "edit of another apply block expanding the batch? Put all edits in one apply(...)")
        call = _Call(step=step, timestep=ctx.timestep if ctx else None, branches=branches,
                     conditionings=conds, image_hw=adapter.image_hw(module, args, kwargs), batch=batch,
                     layout=adapter.token_layout(module, args, kwargs))
        rows = sorted({r for i, e in enumerate(self.edits) if isinstance(e, Compose)
                       for name, sl in branches if e.applies(call.step, name) for r in _rows_of(sl, batch)})
        self._call = call
        if rows:
            if not conds:
                raise ValueError("Compose needs each row's Conditioning, which this U-Net call did not announce; "
                                 "call the model through an interp.Denoiser with Conditioning objects")
            exp = plan_expansion(batch, conds, rows)
            if exp.parents:
                call.expansion = exp
                return expand_inputs(args, kwargs, exp)
        return None

    def _adapter(self, module: nn.Module) -> Adapter:
        """The network's family adapter (the Denoiser's own, else chosen from the class; built once)."""
        if self._family is None:
            from interp.denoiser import Denoiser

            self._family = self.target.adapter if isinstance(self.target, Denoiser) else adapter_for(module)
        return self._family

    def _count(self, i: int, path: str, step: int | None, branch: str, rows: int) -> None:
        key = (i, path, -1 if step is None else step, branch)
        entry = self._fired.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += rows

    def _state(self, batch: int) -> _Call:
        call = self._call
        if call is not None and batch == call.rows:
            return call
        if call is not None:
            raise ValueError(f"a module ran with batch {batch} inside a U-Net call of {call.rows} rows; "
                             "interventions assume the batch of the U-Net call at every site")
        ctx = current_call()  # a submodule called directly, outside a U-Net call
        return _Call(step=ctx.step if ctx else None, timestep=None, branches=(("cond", slice(0, batch)),),
                     conditionings=(), image_hw=None, batch=batch)

    def _patch(self, i: int, path: str, out: Any, call: _Call) -> Any:
        edit = self.edits[i]
        assert isinstance(edit, Patch)
        act = pick_stream(out, None, call.layout, path=path)  # dual-stream blocks: the image stream, as captured
        new = None
        for name, sl in call.branches:
            if not edit.applies(call.step, name):
                continue
            rows = act[sl]
            idx = _rows_of(sl, call.batch)
            info = CallInfo(site=path, step=call.step, branch=name, timestep=call.timestep,
                            conditionings=tuple(call.conditionings[r] for r in idx) if call.conditionings else (),
                            image_hw=call.image_hw)
            value = edit.source.value(rows, info, self._cache)
            if new is None:
                new = act.clone()
            new[sl] = _write(rows, value, edit, call.image_hw, path)
            self._count(i, path, call.step, name, len(idx))
        return out if new is None else replace_stream(out, None, call.layout, new, path=path)

    def _compose(self, i: int, path: str, out: Any, call: _Call) -> Any:
        edit = self.edits[i]
        assert isinstance(edit, Compose)
        if call.expansion is None:
            return out
        rows: list[int] = []
        for name, sl in call.branches:
            if edit.applies(call.step, name):
                here = [r for r in _rows_of(sl, call.batch) if r in call.expansion.null]
                if here:
                    rows += here
                    self._count(i, path, call.step, name, len(here))
        if not rows:
            return out
        act = primary_tensor(out)
        return replace_primary(out, compose_rows(act, call.expansion, rows, edit.radius, edit.soft, call.image_hw, path))

    def _site_hook(self, i: int, path: str) -> Any:
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            if not self._active():
                return None
            call = self._state(int(pick_stream(out, None, self._call.layout if self._call else None, path=path).shape[0]))
            edit = self.edits[i]
            if isinstance(edit, Patch):
                return self._patch(i, path, out, call)
            return self._compose(i, path, out, call)

        return hook

    def _on_return(self, module: nn.Module, args: tuple, out: Any) -> Any:
        call, self._call = self._call, None
        if call is None or not self._active():
            return None
        result = out
        for i, path, _ in self._resolved:  # composition of the output first (it needs the auxiliary rows)
            if path == OUTPUT and isinstance(self.edits[i], Compose):
                result = self._compose(i, path, result, call)
        if call.expansion is not None:
            result = replace_primary(result, primary_tensor(result)[: call.batch])
            call = _Call(call.step, call.timestep, call.branches, call.conditionings, call.image_hw, call.batch)
        for i, path, _ in self._resolved:
            if path == OUTPUT and isinstance(self.edits[i], Patch):
                result = self._patch(i, path, result, call)
        return None if result is out else result

    def _bias_fn(self, i: int, path: str) -> Any:
        edit = self.edits[i]
        assert isinstance(edit, MaskCrossAttention)

        def bias_for(attn: nn.Module, hidden: Tensor, keys: Tensor) -> Tensor | None:
            if not self._active() or self._call is None:
                return None
            call = self._call
            if hidden.shape[0] != call.rows:
                raise ValueError(f"MaskCrossAttention at {path!r}: the layer got {hidden.shape[0]} rows but the U-Net "
                                 f"call has {call.rows}; is a Compose of another apply block expanding the batch? "
                                 "Put all edits in one apply(...)")
            branch_of = call.row_branch()
            selected = [b is not None and edit.applies(call.step, b) for b in branch_of]
            if not any(selected):
                return None
            for name in {b for b, s in zip(branch_of, selected) if s}:
                self._count(i, path, call.step, name, sum(1 for b, s in zip(branch_of, selected) if s and b == name))
            if edit.radius >= _DIAGONAL:  # every cell centre lies within the radius of every location: hide nothing
                return None
            if hidden.dim() == 4:
                hw = (int(hidden.shape[2]), int(hidden.shape[3]))
            else:
                hw = layer_grid(int(hidden.shape[1]), call.image_hw)
            key = ("bias", i, hw, int(keys.shape[1]))
            if key not in call.cache:  # one bias per layer resolution and edit per call
                hide = hidden_tokens(call.row_conditionings(), selected, int(keys.shape[1]), hw, edit.radius, path)
                call.cache[key] = None if hide is None else torch.where(
                    hide, torch.tensor(MASKED), torch.tensor(0.0)).to(device=hidden.device, dtype=hidden.dtype)
            return call.cache[key]

        return bias_for

    # ------------------------------------------------------------------ results
    def frame(self):
        """Tidy ``pandas.DataFrame``: one row per (edit, site, step, branch) that fired.

        Columns: ``edit`` (index), ``label``, ``kind``, ``site``, ``step`` (``-1``: no sampling loop), ``branch``,
        ``calls`` (module calls in which it fired) and ``rows`` (batch rows edited, summed over calls).
        """
        import pandas as pd

        rows = [{"edit": i, "label": self.edits[i].label, "kind": self.edits[i].KIND, "site": site, "step": step,
                 "branch": branch, "calls": n, "rows": r}
                for (i, site, step, branch), (n, r) in sorted(self._fired.items())]
        return pd.DataFrame(rows, columns=["edit", "label", "kind", "site", "step", "branch", "calls", "rows"])

    def to_dict(self) -> dict[str, Any]:
        """The edits (``Edit.to_dict``), the sites they resolved to, and what fired (records of :meth:`frame`)."""
        return {"edits": [e.to_dict() for e in self.edits],
                "sites": [{"edit": i, "site": p} for i, p in self.sites],
                "fired": self.frame().to_dict(orient="records")}


def _flatten(edits: Iterable[Any]) -> list[Edit]:
    out: list[Edit] = []
    for e in edits:
        if isinstance(e, Edit):
            out.append(e)
        elif isinstance(e, (list, tuple)):
            out += _flatten(e)
        else:
            raise TypeError(f"apply(target, *edits): expected Patch, MaskCrossAttention or Compose edits, got {type(e).__name__}")
    return out


def apply(target: Any, *edits: Edit | Iterable[Edit]) -> Applied:
    """Install ``edits`` on ``target`` for the duration of a ``with`` block.

    Args:
        target: an :class:`interp.Denoiser`, a bare U-Net, or a diffusers pipeline (its ``unet``).
        edits: :class:`Patch`, :class:`MaskCrossAttention`, :class:`Compose` objects (lists are flattened),
            applied in order where they meet at one site.

    Returns:
        An :class:`Applied` context manager; after (or during) the block, ``applied.frame()`` lists what fired.

    Raises:
        interp.site.SiteError: an edit's site names no module (the message lists close matches).
        EditConflictError: another live block already edits one of these modules.
        ValueError / TypeError: bad edits (e.g. MaskCrossAttention on a module that is not cross-attention).
    """
    flat = _flatten(edits)
    if not flat:
        raise ValueError("apply(target, *edits) got no edits; pass at least one Patch, MaskCrossAttention or Compose")
    return Applied(target, flat)


__all__ = ["Applied", "EditConflictError", "apply"]
