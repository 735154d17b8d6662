"""Sites: *where* in a network, and *when* in sampling, an activation is read or written.

A :class:`Site` names module paths (exact, or a glob such as ``*.attn2`` that matches across dots),
the denoising steps and CFG branches it applies to, and optionally a spatial region or a set of
channels. Resolving a site against a model either yields real ``(path, module)`` pairs or raises a
:class:`SiteError` that lists the closest real paths — a typo never silently captures nothing.

Spatial regions are given in *normalised* image coordinates ``(y0, y1, x0, x1)`` in ``[0, 1]`` so that
one region means the same part of the image at every resolution of the U-Net.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from interp.context import BRANCHES
from interp.streams import check_stream

StepSelector = int | slice | range | Sequence[int] | None
BranchSelector = str | Sequence[str] | None


class SiteError(LookupError):
    """A site that does not resolve against a model (the message lists the closest real paths)."""


def module_paths(model: nn.Module) -> list[str]:
    """Every named submodule path of ``model`` (the root, ``""``, excluded)."""
    return [name for name, _ in model.named_modules() if name]


def close_matches(pattern: str, paths: Sequence[str], n: int = 5) -> list[str]:
    """The real paths most similar to ``pattern`` (by whole path, then by last components)."""
    plain = pattern.replace("*", "").replace("?", "").strip(".")
    found = difflib.get_close_matches(plain, paths, n=n, cutoff=0.5)
    if len(found) < n and plain:
        tail = plain.split(".")[-1]
        by_tail = [p for p in paths if p.split(".")[-1] == tail or p.endswith(plain)]
        found += [p for p in by_tail if p not in found][: n - len(found)]
    if len(found) < n:
        found += [p for p in difflib.get_close_matches(plain, paths, n=n, cutoff=0.3) if p not in found]
    return found[:n]


def resolve_paths(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` whose dotted path equals or glob-matches ``pattern``, in execution-tree order.

    Raises:
        SiteError: when nothing matches, listing the closest real module paths.
    """
    modules = dict(model.named_modules())
    if pattern in modules and pattern:
        return [(pattern, modules[pattern])]
    if any(ch in pattern for ch in "*?["):
        hits = [(p, m) for p, m in modules.items() if p and fnmatch.fnmatchcase(p, pattern)]
        if hits:
            return hits
    paths = module_paths(model)
    suggestions = close_matches(pattern, paths)
    hint = "\n  ".join(suggestions) if suggestions else "(no similar path)"
    raise SiteError(
        f"no module of {type(model).__name__} matches {pattern!r}. Closest real paths:\n  {hint}\n"
        "Use an exact dotted path or a glob such as '*.attn2' (interp.site.module_paths(model) lists all)."
    )


def _is_index(value: Any) -> bool:
    """A plain non-negative int (``bool`` is an int to Python, never a step or channel here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_slice(sel: slice, what: str) -> None:
    for part, name in ((sel.start, "start"), (sel.stop, "stop")):
        if part is not None and not _is_index(part):
            raise ValueError(f"Site.{what} slice {name} must be an int >= 0 or None, got {part!r} in {sel!r}")
    if sel.step is not None and not (_is_index(sel.step) and sel.step > 0):
        raise ValueError(f"Site.{what} slice step must be an int > 0 or None, got {sel.step!r} in {sel!r}")


def _index_selector(value: Any, what: str, example: str) -> int | slice | range | tuple[int, ...] | None:
    """Validate a step / channel selector; a list (or any iterable of ints) becomes a tuple.

    Negative indices are refused: a step counts from the start of the run, and "the last steps" cannot be
    resolved before the run has ended.
    """
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, (str, bytes, float)):
        raise TypeError(f"Site.{what} must be {example}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"Site.{what} must be >= 0 (counted from the start), got {value}")
        return value
    if isinstance(value, slice):
        _check_slice(value, what)
        return value
    if isinstance(value, range):
        if value.step < 0 or value.start < 0 or not len(value):
            raise ValueError(f"Site.{what} range must be non-empty and increasing, with ints >= 0; got {value!r}")
        return value
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"Site.{what} must be {example}, got {type(value).__name__} {value!r}") from None
    if not items:
        raise ValueError(f"Site.{what} is an empty list, which selects nothing; pass None for all")
    bad = [v for v in items if not _is_index(v)]
    if bad:
        raise ValueError(f"Site.{what} must hold ints >= 0, got {bad[:5]} in {list(items)[:10]}")
    return items


def _branch_selector(value: Any) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"Site.branch must be a branch name, a list of them or None, got {value!r}") from None
    bad = [b for b in items if b not in BRANCHES]
    if bad or not items:
        raise ValueError(
            f"Site.branch {value!r} names no CFG branch ({', '.join(repr(b) for b in bad) or 'empty'}); "
            f"valid branches are {', '.join(repr(b) for b in BRANCHES)}, or None for all"
        )
    return value if isinstance(value, str) else items


def _steps_match(sel: StepSelector, step: int | None) -> bool:
    if sel is None:
        return True
    if step is None:
        return False
    if isinstance(sel, int):
        return step == sel
    if isinstance(sel, slice):
        start, stop, stride = sel.start or 0, sel.stop, sel.step or 1
        return step >= start and (stop is None or step < stop) and (step - start) % stride == 0
    return step in set(sel)


@dataclass(frozen=True)
class Site:
    """A place in the network and the moments of sampling at which it applies.

    Attributes:
        path: a module path (``"up_blocks.1.attentions.0"``) or glob (``"*.attn2"``).
        steps: denoising step(s) — an int, a slice/range, a list, or ``None`` for every call.
        branch: CFG branch name(s) (``"cond"``, ``"uncond"``) or ``None`` for all branches.
        region: spatial region ``(y0, y1, x0, x1)`` in normalised ``[0, 1]`` coordinates, or ``None``.
        channels: channel indices (a list or slice) or ``None`` for all channels.
        io: read the module's ``"output"`` (default) or its first positional ``"input"``.
        stream: on transformers whose modules carry image and text tokens (SD3, Flux), which one: ``"image"``
            (the default where an output holds both: what a U-Net site means) or ``"text"``; told apart by
            their lengths, an ambiguous output is refused (:mod:`interp.streams`).
    """

    path: str
    steps: StepSelector = None
    branch: BranchSelector = None
    region: tuple[float, float, float, float] | None = None
    channels: Sequence[int] | slice | None = None
    io: Literal["output", "input"] = "output"
    stream: Literal["image", "text"] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"a Site needs a non-empty module path or glob, got {self.path!r}")
        if self.io not in ("output", "input"):
            raise ValueError(f"Site.io must be 'output' or 'input', got {self.io!r}")
        check_stream(self.stream)
        # A typo in a selector would otherwise match no call and capture nothing, silently: refuse it here.
        # Lists become tuples (the frozen Site stays comparable and a generator is not consumed twice).
        object.__setattr__(self, "steps", _index_selector(
            self.steps, "steps", "a step index (int >= 0), a slice, a range, a list of ints, or None for every step"))
        object.__setattr__(self, "branch", _branch_selector(self.branch))
        object.__setattr__(self, "channels", _index_selector(
            self.channels, "channels", "a list of channel indices (ints >= 0), a slice, or None for all channels"))
        if isinstance(self.channels, int):
            raise TypeError(f"Site.channels must be a list or a slice (keeps the channel axis), got "
                            f"{self.channels!r}; pass [{self.channels}]")
        if self.region is not None:
            y0, y1, x0, x1 = self.region
            if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
                raise ValueError(
                    f"Site.region {self.region} must be (y0, y1, x0, x1) with 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1"
                )

    def resolve(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The ``(path, module)`` pairs this site names in ``model`` (raises :class:`SiteError` if none)."""
        return resolve_paths(model, self.path)

    @property
    def selective(self) -> bool:
        """Whether this site selects particular steps or branches (a capture then checks that it matched a call)."""
        return self.steps is not None or self.branch is not None

    def applies(self, step: int | None, branch: str) -> bool:
        """Whether this site is active at ``step`` on ``branch``."""
        if not _steps_match(self.steps, step):
            return False
        if self.branch is None:
            return True
        wanted = (self.branch,) if isinstance(self.branch, str) else tuple(self.branch)
        return branch in wanted

    def select(self, activation: torch.Tensor, image_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Restrict an activation to this site's channels and region.

        Args:
            activation: ``(B, C, h, w)`` feature map or ``(B, N, C)`` token sequence with ``N = h * w``.
            image_hw: the U-Net input's ``(H, W)``, needed to unflatten token sequences for a region.

        Returns:
            The selected part, same layout as the input (``(B, C', h', w')`` or ``(B, N', C')``).
        """
        out = activation
        if self.channels is not None:
            idx = self.channels if isinstance(self.channels, slice) else list(self.channels)
            out = out[:, idx] if out.dim() == 4 else out[..., idx]
        if self.region is not None:
            out = spatial_view(out, image_hw)
            h, w = out.shape[-2:]
            y0, y1, x0, x1 = self.region
            rows = slice(math.floor(y0 * h), max(math.ceil(y1 * h), math.floor(y0 * h) + 1))
            cols = slice(math.floor(x0 * w), max(math.ceil(x1 * w), math.floor(x0 * w) + 1))
            out = out[..., rows, cols]
        return out


def spatial_view(activation: torch.Tensor, image_hw: tuple[int, int] | None) -> torch.Tensor:
    """View an activation as ``(B, C, h, w)``: 4-D maps pass through, ``(B, N, C)`` tokens are unflattened.

    The token grid's side ratio is taken from the U-Net input's ``image_hw``.
    """
    if activation.dim() == 4:
        return activation
    if activation.dim() != 3 or image_hw is None:
        raise ValueError(
            f"cannot view an activation of shape {tuple(activation.shape)} spatially; "
            "expected (B, C, h, w), or (B, N, C) together with the input's (H, W)"
        )
    H, W = image_hw
    n = activation.shape[1]
    scale = math.sqrt(H * W / n)
    h, w = round(H / scale), round(W / scale)
    if h * w != n:
        raise ValueError(f"{n} tokens do not form a grid with the input's aspect ratio {H}x{W}")
    return activation.transpose(1, 2).reshape(activation.shape[0], activation.shape[2], h, w)


def as_sites(sites: Site | str | Iterable[Site | str]) -> list[Site]:
    """Normalise a site, a path/glob string, or an iterable of either into a list of :class:`Site`."""
    if isinstance(sites, (Site, str)):
        sites = [sites]
    out = [s if isinstance(s, Site) else Site(s) for s in sites]
    if not out:
        raise ValueError("no sites given: pass a Site, a module path or glob, or a list of them")
    return out
