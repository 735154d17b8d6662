"""Where a patched activation comes from: zero, another run's capture, a mean over a capture, or a function.

A source is a small frozen dataclass (JSON round-trip through ``to_dict`` / :func:`source_from_dict`). The
values are looked up while an :func:`interventions.apply` block runs, keyed by the *current* U-Net call:
the site being patched, the denoising step (``-1`` outside a sampling loop, as in the stores) and the CFG
branch. Stores opened from a folder and means are computed once per ``apply`` block (its ``cache``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.store import ActivationStore, open_store


@dataclass(frozen=True)
class CallInfo:
    """What a :class:`Fn` source is told about the activation it rewrites.

    Attributes:
        site: the module path being patched (``"output"``: the U-Net's own output).
        step: denoising step, ``None`` outside a sampling loop.
        branch: CFG branch of these rows (``"cond"`` / ``"uncond"``).
        timestep: scheduler timestep of the call, when announced.
        conditionings: the Conditioning of each row (``None`` entries when unknown).
        image_hw: the U-Net input's ``(H, W)``.
    """

    site: str
    step: int | None
    branch: str
    timestep: float | None
    conditionings: tuple[Any, ...]
    image_hw: tuple[int, int] | None


class Source:
    """Base class of patch sources; see :class:`Zero`, :class:`FromStore`, :class:`Mean`, :class:`Fn`."""

    def value(self, rows: Tensor, info: CallInfo, cache: dict) -> Tensor:
        """The replacement for ``rows`` ``(b, ...)``: same shape, a ``(1, ...)`` broadcast, or a selected part."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def check(self, paths: list[str], cache: dict) -> None:
        """Fail fast on entering ``apply`` (e.g. a store that holds none of the patched sites)."""

    @property
    def label(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Zero(Source):
    """Zero-ablation: the activation becomes zeros."""

    def value(self, rows: Tensor, info: CallInfo, cache: dict) -> Tensor:
        return torch.zeros((1, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Zero"}

    @property
    def label(self) -> str:
        return "zero"


def _check_store(store: Any, cls: str) -> ActivationStore | str:
    if isinstance(store, Path):
        return str(store)
    if isinstance(store, (ActivationStore, str)):
        if isinstance(store, str) and not store:
            raise ValueError(f"{cls}(store=...) got an empty folder path")
        return store
    raise TypeError(f"{cls}(store=...) must be an ActivationStore (e.g. cap.store) or a store folder, "
                    f"got {type(store).__name__}")


def _check_site(site: Any, cls: str) -> None:
    if site is not None and (not isinstance(site, str) or not site):
        raise TypeError(f"{cls}(site=...) must be a module path as stored (a str) or None for the patched site, got {site!r}")


def _store_dict(store: ActivationStore | str) -> dict[str, Any]:
    if isinstance(store, str):
        return {"store": store, "reloadable": True}
    root = getattr(store, "root", None)
    if root is not None:
        return {"store": str(root), "reloadable": True}
    return {"store": None, "store_kind": type(store).__name__, "reloadable": False}


def _open(store: ActivationStore | str, cache: dict) -> ActivationStore:
    if isinstance(store, ActivationStore):
        return store
    key = ("store", store)
    if key not in cache:
        cache[key] = open_store(store)
    return cache[key]


def _missing(store: ActivationStore, site: str, step: int, branch: str, cls: str) -> KeyError:
    here = [k for k in store.keys() if k.site == site]
    if not here:
        return KeyError(f"{cls}: the store holds nothing for site {site!r}; it holds sites {store.sites()[:12]}")
    steps = sorted({k.step for k in here})
    branches = sorted({k.branch for k in here})
    return KeyError(
        f"{cls}: the store holds nothing for site {site!r} at step {step} on branch {branch!r}; for that site it "
        f"has steps {steps[:20]} and branches {branches} (step -1: captured outside a sampling loop). Capture the "
        "run whose steps/branches you patch, or restrict the Patch with steps=/branch="
    )


@dataclass(frozen=True, eq=False)
class FromStore(Source):
    """The activation captured at the same site, step and branch in another run.

    Args:
        store: an :class:`~interp.store.ActivationStore` (``cap.store``) or a folder for :func:`interp.open_store`.
        site: read this stored site instead of the patched module's own path (e.g. patch one block with another
            block's activation of the same shape).

    A store holding several calls for one (site, step, branch) is refused: which one to use is ambiguous.
    """

    store: ActivationStore | str
    site: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", _check_store(self.store, "FromStore"))
        _check_site(self.site, "FromStore")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.site == other.site and (
            self.store == other.store if isinstance(self.store, str) else self.store is other.store)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.site, self.store if isinstance(self.store, str) else id(self.store)))

    def check(self, paths: list[str], cache: dict) -> None:
        store = _open(self.store, cache)
        sites = set(store.sites())
        missing = [p for p in ([self.site] if self.site else paths) if p not in sites]
        if missing:
            raise KeyError(f"FromStore: the store holds nothing for site(s) {missing}; it holds sites {sorted(sites)[:12]}. "
                           "Capture those sites (interventions.record) or pass site= to read another one")

    def value(self, rows: Tensor, info: CallInfo, cache: dict) -> Tensor:
        store = _open(self.store, cache)
        site = self.site or info.site
        step = -1 if info.step is None else info.step
        hits = store.find(site, step, info.branch)
        if not hits:
            raise _missing(store, site, step, info.branch, "FromStore")
        if len(hits) > 1:
            raise ValueError(
                f"FromStore: the store holds {len(hits)} calls for site {site!r}, step {step}, branch {info.branch!r} "
                f"(calls {[k.call for k in hits[:8]]}); which to patch in is ambiguous. Capture one run per store "
                "(outside a sampling loop every call has step -1), or split the store"
            )
        key = ("tensor", id(store), hits[0], rows.device, rows.dtype)
        if key not in cache:  # moved to the model's device once per apply block
            cache[key] = store[hits[0]].to(device=rows.device, dtype=rows.dtype)
        return cache[key]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "FromStore", **_store_dict(self.store), "site": self.site}

    @property
    def label(self) -> str:
        return "store" + (f"[{self.site}]" if self.site else "")


@dataclass(frozen=True, eq=False)
class Mean(Source):
    """The mean of every tensor captured at the site and branch, over steps and batch rows (broadcast).

    Args:
        store: an ActivationStore or a store folder.
        site: read this stored site instead of the patched module's path.
    """

    store: ActivationStore | str
    site: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", _check_store(self.store, "Mean"))
        _check_site(self.site, "Mean")

    __eq__ = FromStore.__eq__
    __hash__ = FromStore.__hash__

    def check(self, paths: list[str], cache: dict) -> None:
        FromStore.check(self, paths, cache)  # type: ignore[arg-type]

    def value(self, rows: Tensor, info: CallInfo, cache: dict) -> Tensor:
        store = _open(self.store, cache)
        site = self.site or info.site
        key = ("mean", id(store), site, info.branch, rows.device, rows.dtype)
        if key not in cache:
            hits = store.find(site, None, info.branch)
            if not hits:
                raise _missing(store, site, -1 if info.step is None else info.step, info.branch, "Mean")
            total, count = None, 0
            for k in hits:
                t = store[k].to(torch.float64)
                total = t.sum(0) if total is None else total + t.sum(0)
                count += t.shape[0]
            cache[key] = (total / count).unsqueeze(0).to(device=rows.device, dtype=rows.dtype)
        return cache[key]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Mean", **_store_dict(self.store), "site": self.site}

    @property
    def label(self) -> str:
        return "mean" + (f"[{self.site}]" if self.site else "")


@dataclass(frozen=True)
class Fn(Source):
    """A user function ``fn(activation, call) -> activation``.

    ``activation`` is the ``(b, ...)`` activation of one branch's rows (the whole module output, before any
    region/channel selection) and ``call`` a :class:`CallInfo`; the return value must have the same shape
    (the Patch's region/channels are then taken from it). ``to_dict`` records the function's qualified name
    only: a dict cannot bring code back, so :func:`source_from_dict` refuses it.
    """

    fn: Callable[[Tensor, CallInfo], Tensor]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Fn(fn) needs a callable fn(activation, call) -> activation, got {type(self.fn).__name__}")

    def value(self, rows: Tensor, info: CallInfo, cache: dict) -> Tensor:
        out = self.fn(rows, info)
        if not isinstance(out, Tensor):
            raise TypeError(f"Fn({self.name}) returned {type(out).__name__} at site {info.site!r}; it must return a "
                            f"tensor of the activation's shape {tuple(rows.shape)}")
        return out

    @property
    def name(self) -> str:
        mod = getattr(self.fn, "__module__", None) or "?"
        return f"{mod}.{getattr(self.fn, '__qualname__', type(self.fn).__name__)}"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Fn", "fn": self.name, "reloadable": False}

    @property
    def label(self) -> str:
        return f"fn[{getattr(self.fn, '__qualname__', type(self.fn).__name__)}]"


def source_from_dict(d: dict[str, Any]) -> Source:
    """Rebuild a source from :meth:`Source.to_dict` (``Fn`` and in-memory stores cannot be rebuilt)."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"a source dict needs a 'type' key, got {d!r}")
    kind = d["type"]
    if kind == "Zero":
        return Zero()
    if kind in ("FromStore", "Mean"):
        if d.get("store") is None:
            raise ValueError(f"this {kind} source held an in-memory {d.get('store_kind', 'store')}, which a dict "
                             f"cannot carry; build {kind}(store) again (or capture to a folder to make it reloadable)")
        cls = FromStore if kind == "FromStore" else Mean
        return cls(d["store"], site=d.get("site"))
    if kind == "Fn":
        raise ValueError(f"Fn source {d.get('fn')!r} is not reloadable from a dict (code is not serialised); "
                         "rebuild it with Fn(your_function)")
    raise ValueError(f"unknown source type {kind!r}; expected Zero, FromStore, Mean or Fn")


__all__ = ["CallInfo", "FromStore", "Fn", "Mean", "Source", "Zero", "source_from_dict"]
