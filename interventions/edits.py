"""The edits: frozen dataclasses that say exactly what an intervention does, with a JSON round-trip.

Every edit selects *where* (``sites``: module paths or globs; ``"output"`` is the U-Net's own output), *when*
(``steps``: denoising steps, ``None`` = every call) and *which CFG rows* (``branch``: ``"cond"``,
``"uncond"``, a list, or ``None`` = all). The selection semantics are :class:`interp.site.Site`'s (the same
validation: a typo never silently selects nothing). ``label`` is a short string for a sweep row;
``to_dict`` / :meth:`Edit.from_dict` round-trip through JSON.

Edits do nothing by themselves: :func:`interventions.apply` installs them on a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from interp.site import Site

from interventions.sources import Source, Zero, source_from_dict

OUTPUT = "output"
"""The special site naming the U-Net module's own output (the prediction)."""


def _norm_sites(sites: Any, cls: str) -> tuple[str, ...]:
    if isinstance(sites, str):
        sites = (sites,)
    if isinstance(sites, Site):
        raise TypeError(f"{cls}(sites=...) takes module paths/globs (str); give steps=/branch= to the edit, "
                        f"not a Site: use {sites.path!r}")
    try:
        items = tuple(sites)
    except TypeError:
        raise TypeError(f"{cls}(sites=...) must be a module path/glob or a list of them, got {type(sites).__name__}") from None
    if not items:
        raise ValueError(f"{cls}(sites=...) is empty, which edits nothing; pass a module path, a glob ('*attn2') or 'output'")
    bad = [s for s in items if not isinstance(s, str) or not s]
    if bad:
        raise TypeError(f"{cls}(sites=...) must hold non-empty strings (paths/globs), got {bad[:4]}")
    return items


def _fmt_steps(steps: Any) -> str:
    if steps is None:
        return "all"
    if isinstance(steps, int):
        return str(steps)
    if isinstance(steps, range) and steps.step == 1:
        return f"{steps.start}-{steps.stop - 1}"
    if isinstance(steps, slice):
        return f"{steps.start or 0}-{'' if steps.stop is None else steps.stop - 1}" + (f"/{steps.step}" if steps.step else "")
    items = list(steps)
    if len(items) > 1 and items == list(range(items[0], items[-1] + 1)):
        return f"{items[0]}-{items[-1]}"
    return ",".join(map(str, items))


def _steps_to_json(steps: Any) -> Any:
    if steps is None or isinstance(steps, int):
        return steps
    if isinstance(steps, range):
        return {"range": [steps.start, steps.stop, steps.step]}
    if isinstance(steps, slice):
        return {"slice": [steps.start, steps.stop, steps.step]}
    return list(steps)


def _steps_from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "range" in value:
            return range(*value["range"])
        if "slice" in value:
            return slice(*value["slice"])
        raise ValueError(f"steps dict must hold 'range' or 'slice', got {value!r}")
    return value


def _check_radius(radius: Any, cls: str, *, positive: bool) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)):
        raise TypeError(f"{cls}(radius=...) must be a number (normalised Euclidean units), got {type(radius).__name__}")
    r = float(radius)
    if not math.isfinite(r) or r < 0 or (positive and r == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{cls}(radius={radius!r}) must be finite and {need} (normalised units: a fraction of the image side)")
    return r


@dataclass(frozen=True)
class Edit:
    """Base class: the selection shared by every edit (``sites``, ``steps``, ``branch``)."""

    KIND: ClassVar[str] = "edit"

    def _normalise_selection(self) -> None:
        cls = type(self).__name__
        object.__setattr__(self, "sites", _norm_sites(self.sites, cls))
        probe = Site(self.sites[0], steps=self.steps, branch=self.branch)  # Site's own validation and normalisation
        object.__setattr__(self, "steps", probe.steps)
        object.__setattr__(self, "branch", probe.branch)

    def site(self, path: str) -> Site:
        """The :class:`~interp.site.Site` this edit applies at ``path`` (selection semantics)."""
        return Site(path, steps=self.steps, branch=self.branch, region=getattr(self, "region", None),
                    channels=getattr(self, "channels", None))

    def applies(self, step: int | None, branch: str) -> bool:
        """Whether the edit is active at ``step`` on ``branch``."""
        return Site(self.sites[0], steps=self.steps, branch=self.branch).applies(step, branch)

    def _suffix(self) -> str:
        sites = ",".join(self.sites)
        out = f" @{sites}"
        if self.steps is not None:
            out += f" steps={_fmt_steps(self.steps)}"
        if self.branch is not None:
            out += f" branch={self.branch if isinstance(self.branch, str) else '+'.join(self.branch)}"
        return out

    @property
    def label(self) -> str:
        raise NotImplementedError

    def _base_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "sites": list(self.sites), "steps": _steps_to_json(self.steps),
                "branch": self.branch if self.branch is None or isinstance(self.branch, str) else list(self.branch)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (``Edit.from_dict`` rebuilds it)."""
        raise NotImplementedError

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Edit:
        """Rebuild any edit from its :meth:`to_dict` (sources that cannot be serialised are refused)."""
        if not isinstance(d, dict) or "type" not in d:
            raise ValueError(f"an edit dict needs a 'type' key, got {d!r}")
        kinds = {"Patch": Patch, "MaskCrossAttention": MaskCrossAttention, "Compose": Compose}
        if d["type"] not in kinds:
            raise ValueError(f"unknown edit type {d['type']!r}; expected one of {sorted(kinds)}")
        args = {k: v for k, v in d.items() if k != "type"}
        args["steps"] = _steps_from_json(args.get("steps"))
        if d["type"] == "Patch":
            args["source"] = source_from_dict(args["source"])
            if args.get("channels") is not None and isinstance(args["channels"], dict):
                args["channels"] = slice(*args["channels"]["slice"])
        return kinds[d["type"]](**args)


@dataclass(frozen=True)
class Patch(Edit):
    """Replace a module's output (its primary tensor) by a source's value at the selected steps and rows.

    Args:
        sites: module path(s)/glob(s), or ``"output"`` for the U-Net's own output.
        source: :class:`~interventions.Zero`, :class:`~interventions.FromStore`, :class:`~interventions.Mean`
            or :class:`~interventions.Fn`.
        steps: denoising step(s) (int, range, slice, list) or ``None`` for every call.
        branch: CFG branch(es) or ``None`` for all.
        region: normalised ``(y0, y1, x0, x1)``: patch only this part of the map (``Site.select`` semantics).
        channels: patch only these channels (list or slice).

    The source's value for one branch's rows ``(b, ...)`` may have the activation's full shape, a ``(1, ...)``
    broadcast (means, zeros), or the shape of the selected region/channels alone; anything else is a
    ``ValueError`` naming both shapes and the site. Only the call's own rows are patched: the auxiliary rows a
    :class:`Compose` in the same block appends (``∅``, ``c_j``) are left as computed.
    """

    KIND: ClassVar[str] = "patch"
    sites: str | Sequence[str]
    source: Source = field(default_factory=Zero)
    steps: Any = None
    branch: Any = None
    region: tuple[float, float, float, float] | None = None
    channels: Any = None

    def __post_init__(self) -> None:
        self._normalise_selection()
        if not isinstance(self.source, Source):
            raise TypeError(f"Patch(source=...) must be Zero(), FromStore(store), Mean(store) or Fn(fn), "
                            f"got {type(self.source).__name__}")
        if self.region is not None:
            object.__setattr__(self, "region", tuple(float(v) for v in self.region))
        probe = Site(self.sites[0], region=self.region, channels=self.channels)
        object.__setattr__(self, "channels", probe.channels)

    @property
    def label(self) -> str:
        sel = ""
        if self.region is not None:
            sel += " region=(" + ",".join(f"{v:g}" for v in self.region) + ")"
        if self.channels is not None:
            sel += f" channels={_fmt_steps(self.channels)}"
        return f"patch {self.source.label}{sel}{self._suffix()}"

    def to_dict(self) -> dict[str, Any]:
        ch = self.channels
        return {**self._base_dict(), "source": self.source.to_dict(),
                "region": None if self.region is None else list(self.region),
                "channels": None if ch is None else ({"slice": [ch.start, ch.stop, ch.step]} if isinstance(ch, slice) else list(ch))}


@dataclass(frozen=True)
class MaskCrossAttention(Edit):
    """Distance-masked cross-attention (SCIENCE.md §4 (a), *ours*).

    At the selected diffusers ``Attention`` modules (cross-attention only), the query at grid cell ``u``
    may attend only to the tokens of conditioners whose location lies within ``radius`` (normalised
    Euclidean units) of ``u``'s centre, plus the context tokens (owner ``-1``, always visible). ``radius=0``
    leaves only the context tokens; a radius beyond the image diagonal changes nothing (bit for bit).
    """

    KIND: ClassVar[str] = "mask-xattn"
    sites: str | Sequence[str] = "*attn2"
    radius: float = 0.15
    steps: Any = None
    branch: Any = None

    def __post_init__(self) -> None:
        self._normalise_selection()
        object.__setattr__(self, "radius", _check_radius(self.radius, "MaskCrossAttention", positive=False))

    @property
    def label(self) -> str:
        return f"mask-xattn r={self.radius:g}{self._suffix()}"

    def to_dict(self) -> dict[str, Any]:
        return {**self._base_dict(), "radius": self.radius}


@dataclass(frozen=True)
class Compose(Edit):
    """Feature-space composition ``h := h(∅) + Σ_j m_j ⊙ (h(c_j) − h(∅))`` at each site (SCIENCE.md §4 (b)).

    ``m_j`` are the composition masks of :mod:`interp.masks` (discs of ``radius`` around each conditioner,
    each pixel given to its nearest conditioner) at the layer's resolution; ``soft > 0`` gives each disc a
    smooth edge of that width (*ours*, see :func:`interventions.compose.soft_composition_masks`). At
    ``sites="output"`` this is the predecessor paper's score-space composition (:func:`ComposeScores`).

    Rows of the selected branch whose conditioning has ``k >= 1`` located conditioners are computed in one
    batched forward with ``k + 1`` extra rows (``∅, c_1 … c_k``); other rows pass through.
    """

    KIND: ClassVar[str] = "compose"
    sites: str | Sequence[str] = OUTPUT
    radius: float = 0.15
    steps: Any = None
    branch: Any = "cond"
    soft: float = 0.0

    def __post_init__(self) -> None:
        self._normalise_selection()
        object.__setattr__(self, "radius", _check_radius(self.radius, "Compose", positive=True))
        if isinstance(self.soft, bool) or not isinstance(self.soft, (int, float)) or not math.isfinite(self.soft) or self.soft < 0:
            raise ValueError(f"Compose(soft={self.soft!r}) must be a finite width >= 0 (normalised units; 0 = hard discs)")
        object.__setattr__(self, "soft", float(self.soft))

    @property
    def label(self) -> str:
        kind = "compose-scores" if self.sites == (OUTPUT,) else "compose"
        soft = f" soft={self.soft:g}" if self.soft else ""
        return f"{kind} r={self.radius:g}{soft}{self._suffix()}"

    def to_dict(self) -> dict[str, Any]:
        return {**self._base_dict(), "radius": self.radius, "soft": self.soft}


def ComposeScores(radius: float, *, steps: Any = None, branch: Any = "cond", soft: float = 0.0) -> Compose:  # noqa: N802
    """Score-space composition (the predecessor paper's operator): :class:`Compose` at the U-Net output.

    For ε-, v- and x₀-prediction the composition of outputs equals the composition of scores: the score is
    an affine function of the output whose ``x_t`` term cancels in the differences.
    """
    return Compose(OUTPUT, radius=radius, steps=steps, branch=branch, soft=soft)


__all__ = ["OUTPUT", "Compose", "ComposeScores", "Edit", "MaskCrossAttention", "Patch"]
