"""The one result type every probe returns: arrays, their metadata, and a tidy table.

A probe computes *maps* (Jacobian rows, conditional-locality maps, residual maps: arrays whose axes are
named in ``axes``) and *scalar summaries* of them (the 50 % mass radius of pixel (16, 16) at t = 0.5, the
in-region fraction of conditioner 2, ...). :class:`ProbeResult` keeps both, plus the metadata that says
what produced them (model, config hash, site, noise level, seeds, probe parameters, scorescope version).

``result.frame()`` is the tidy long format used everywhere downstream: one row per scalar, with columns
``metric`` and ``value`` plus one column per index (``t``, ``seed``, ``pixel``, ``conditioner``, ...) and
the metadata broadcast over rows — so a sweep is ``pd.concat(r.frame() for r in results)`` and one
seaborn call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

#: Columns every tidy frame starts with (others follow in insertion order).
CORE_COLUMNS = ("model", "site", "t", "metric", "value", "seed")


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach()
        if a.dtype in (torch.bfloat16, torch.float16):
            a = a.float()
        return a.cpu().numpy()
    return np.asarray(a)


def _plain(v: Any) -> Any:
    """JSON-able scalars and lists (tensors, numpy scalars and tuples converted)."""
    if isinstance(v, Tensor):
        v = _to_numpy(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class _CpuMaps(dict):
    """A dict that moves every tensor stored in it to the CPU (results never pin GPU memory)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value.detach().cpu() if isinstance(value, Tensor) else value)


@dataclass
class ProbeResult:
    """Maps + scalar summaries + metadata of one probe call.

    Attributes:
        probe: the probe's name (``"pixel_locality"``, ``"conditional_locality"``, ...).
        maps: named arrays (torch tensors on CPU, float32 unless stated), e.g. ``"G": (P, H, W)``.
        axes: for each map, the names of its axes (``("pixel", "row", "col")``).
        rows: scalar summaries, one dict per value with at least ``metric`` and ``value`` and any index
            columns (``t``, ``seed``, ``pixel_row``, ``conditioner``, ...).
        metadata: what produced the result (model, config hash, site, probe parameters, version).
    """

    probe: str
    maps: dict[str, Tensor] = field(default_factory=dict)
    axes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from interp.metadata import version

        self.metadata.setdefault("version", version())

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "maps" and isinstance(value, dict) and not isinstance(value, _CpuMaps):
            value = _CpuMaps(value)
        super().__setattr__(name, value)

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self.maps[name]
        except KeyError:
            raise KeyError(f"{self.probe} result has no map {name!r}; maps: {sorted(self.maps)}") from None

    def add(self, metric: str, value: float, **index: Any) -> None:
        """Append one scalar summary (``index`` gives its coordinates: ``t=..., conditioner=...``)."""
        self.rows.append({"metric": metric, "value": float(value), **index})

    def frame(self) -> pd.DataFrame:
        """Tidy long table: one row per scalar, metadata broadcast over rows.

        Columns: ``model, site, t, metric, value, seed`` first, then the other index columns, then
        ``probe`` and the remaining scalar metadata (non-scalar metadata stays in :attr:`metadata`).
        """
        df = pd.DataFrame(self.rows if self.rows else [], columns=None)
        if df.empty:
            df = pd.DataFrame(columns=["metric", "value"])
        scalar_meta = {
            k: v for k, v in self.metadata.items() if isinstance(v, (str, int, float, bool)) or v is None
        }
        for k, v in {"probe": self.probe, **scalar_meta}.items():
            if k not in df.columns:
                df[k] = v
        for col in CORE_COLUMNS:
            if col not in df.columns:
                df[col] = None
        ordered = [c for c in CORE_COLUMNS] + [c for c in df.columns if c not in CORE_COLUMNS]
        return df[ordered].reset_index(drop=True)

    def to_dict(self, *, include_maps: bool = True) -> dict[str, Any]:
        """A JSON-able dict (maps as nested lists when ``include_maps``)."""
        out: dict[str, Any] = {
            "probe": self.probe,
            "metadata": _plain(self.metadata),
            "rows": _plain(self.rows),
            "axes": {k: list(v) for k, v in self.axes.items()},
        }
        if include_maps:
            out["maps"] = {k: _plain(v) for k, v in self.maps.items()}
        else:
            out["map_shapes"] = {k: list(v.shape) for k, v in self.maps.items()}
        return out

    def save_json(self, path: str | Path, *, include_maps: bool = True) -> Path:
        """Write :meth:`to_dict` as JSON atomically (:func:`interp.io.atomic_write`: a unique temporary file that
        never follows a planted symlink, then rename)."""
        from interp.io import atomic_write_json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(path, self.to_dict(include_maps=include_maps))

    def plot(self, name: str | None = None, **kw: Any) -> Any:
        """A paper figure of this result (a matplotlib ``Figure``; nothing is shown or written).

        Dispatches with :func:`interp.figures.plot`: the cosine matrix for ``concept_cosines``, otherwise the map
        ``name`` (default: the probe's main map, e.g. ``"G"``, ``"jvp"``) as a panel grid with a labelled
        colorbar. Keywords (``norm=``, ``width=``, ``select=``, ``image=``, ...) go to that figure function.
        matplotlib is imported only here, on the first call.
        """
        from interp import figures

        return figures.plot(self, name, **kw)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.maps.items())
        return f"ProbeResult({self.probe}: maps [{shapes}], {len(self.rows)} summary rows)"


def concat_frames(results: Sequence[ProbeResult]) -> pd.DataFrame:
    """One tidy frame from many results."""
    frames = [r.frame() for r in results]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CORE_COLUMNS))
