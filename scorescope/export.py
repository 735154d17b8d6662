"""Paper-ready export of a probe result's maps: figures (PDF, SVG, PNG), the raw arrays, and their provenance.

:func:`export_maps` writes, for each exported map ``NAME`` of a :class:`~interp.results.ProbeResult` (figures drawn
by :func:`interp.figures.map_figure`), into one output folder:

* ``<probe>-<NAME>.pdf`` / ``.svg`` (vector axes, text and colorbar; the map itself is an embedded pixel image
  drawn with nearest-neighbour interpolation, so every map pixel is one crisp square) and ``.png`` (300 dpi);
* ``<probe>-<NAME>.safetensors`` — the raw map exactly as the result holds it (``NAME``) and the panel array that
  was drawn (``panels`` ``(R, C, H, W)``, before any colour normalisation; channels summed, ``select`` applied);
* ``<probe>-<NAME>.json`` — the sidecar: the map's axes and shape, the panel layout, the colour scale
  (kind, vmin, vmax, log floor), the colorbar label, the files, and the provenance (:func:`provenance`: model,
  config hash, site, noise levels, seeds, quantity, scorescope version, git commit when installed from a git
  checkout).

The folder is claimed with :func:`interp.io.prepare_output_dir` (kind ``export-maps``): a foreign non-empty folder
is refused unless ``overwrite=True``. Inside it, a hidden manifest (``.scorescope-exports.json``) records every
file an export wrote with its SHA-256, so a later export replaces a file only if this command wrote it and nobody
changed it since; any other file of the same name (a user's, an edited export, a link) is refused, with or without
``overwrite``: like every scorescope command, an export never replaces a file it did not create. Nothing else in
the folder is touched. Every file is written atomically (:mod:`interp.io`).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interp import figures
from interp.io import atomic_write, atomic_write_json, prepare_output_dir
from interp.results import ProbeResult

KIND = "export-maps"
MANIFEST = ".scorescope-exports.json"
FORMATS = figures.FORMATS
#: Provenance keys copied from a result's metadata into every sidecar (when present).
PROVENANCE_KEYS = ("model", "model_class", "config_hash", "prediction_type", "site", "sites", "levels", "t", "timestep",
                   "seeds", "n_samples", "quantity", "branch", "method", "directions", "radius", "k", "version")


def git_commit(folder: str | Path | None = None) -> str | None:
    """The commit of the git checkout whose top folder holds ``folder`` directly (default: scorescope's own source
    tree, i.e. the checkout that holds this package), or ``None`` when it is not one.

    Runs ``git rev-parse --show-toplevel HEAD`` only (read-only: it writes nothing, not even the index). No git, no
    repository, any git failure, or a package installed into *another* project's checkout (a virtual environment
    inside a user's repository: its top folder does not hold ``scorescope/``) gives ``None``.
    """
    package = Path(__file__).resolve().parent
    folder = Path(folder).resolve() if folder is not None else package
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=folder, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):  # git missing or hung: no commit to report
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or len(lines[1]) != 40:
        return None
    top = Path(lines[0]).resolve()
    if folder == package and top != package.parent:
        return None
    return lines[1]


def provenance(result: ProbeResult) -> dict[str, Any]:
    """What produced ``result``, JSON-able: :data:`PROVENANCE_KEYS` from its metadata, the probe, the git commit."""
    meta = result.to_dict(include_maps=False)["metadata"]
    out: dict[str, Any] = {"probe": result.probe}
    out.update({k: meta[k] for k in PROVENANCE_KEYS if k in meta})
    commit = git_commit()
    if commit is not None:
        out["git_commit"] = commit
    return out


def stack_sites(results: Sequence[ProbeResult], name: str) -> ProbeResult:
    """Map ``name`` of several results (one per layer / site, same shape) as one result with a leading ``site`` axis,
    for layers × noise-level grids. Metadata is the first result's, with ``site`` replaced by ``sites``."""
    if not results:
        raise ValueError("stack_sites needs at least one result")
    for r in results:
        if name not in r.maps:
            raise ValueError(f"{r.probe} result at site {r.metadata.get('site')!r} has no map {name!r}; "
                             f"maps: {', '.join(sorted(r.maps))}")
    shapes = {tuple(r.maps[name].shape) for r in results}
    if len(shapes) != 1:
        raise ValueError(f"map {name!r} must have one shape at every site to be stacked, got {sorted(shapes)}")
    meta = {k: v for k, v in results[0].metadata.items() if k != "site"}
    meta["sites"] = [str(r.metadata.get("site", i)) for i, r in enumerate(results)]
    out = ProbeResult(results[0].probe, metadata=meta)
    out.maps[name] = torch.stack([r.maps[name] for r in results])
    out.axes[name] = ("site", *results[0].axes.get(name, ()))
    return out


@dataclass
class Export:
    """What :func:`export_maps` wrote: ``paths[map name] = [files]``; ``figures[map name]`` the matplotlib figure."""

    out: Path
    paths: dict[str, list[Path]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


def check_formats(formats: Sequence[str]) -> list[str]:
    """The requested formats, checked (``ValueError`` naming the unknown ones and the accepted ones)."""
    fmts = [f.strip().lower() for f in formats if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise ValueError(f"formats must be a non-empty subset of {', '.join(FORMATS)}; got {list(formats)}")
    return list(dict.fromkeys(fmts))


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.exists():
        return {"files": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it records which files exports wrote: restore it, "
                         "or export into a new folder") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError(f"{path} is not an export manifest; export into a new folder")
    return data


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def export_maps(
    result: ProbeResult,
    out: str | Path,
    *,
    maps: Sequence[str] | None = None,
    formats: Sequence[str] = FORMATS,
    norm: str = "auto",
    width: str | float = "one-column",
    select: Mapping[str, int] | None = None,
    image: Any = None,
    log_floor: float = figures.LOG_FLOOR,
    dpi: int = 300,
    overwrite: bool = False,
) -> Export:
    """Write figures, raw arrays and sidecars of ``result``'s maps into ``out`` (see the module docstring).

    Args:
        result: any probe result.
        out: the output folder (claimed; see the module docstring).
        maps: map names (default: the probe's main map, :func:`interp.figures.default_map`).
        formats: subset of ``pdf``, ``svg``, ``png``.
        norm / width / select / image / log_floor: as in :func:`interp.figures.map_figure`.
        dpi: resolution of the PNG (PDF / SVG are vector).
        overwrite: write into a foreign non-empty folder (its files are kept; a same-named file this command did not
            write is still refused).

    Returns:
        :class:`Export` with the written paths per map.

    Raises:
        ValueError: an unknown map (the message lists the result's maps), format, norm or width — before anything
            is written.
        FileExistsError: a foreign folder without ``overwrite``, or a same-named file this command did not write
            (named in the message) — before anything is written.
    """
    fmts = check_formats(formats)
    names = list(maps) if maps else [figures.default_map(result)]
    missing = [n for n in names if n not in result.maps]
    if missing:
        raise ValueError(f"{result.probe} result has no map(s) {missing}; maps: {', '.join(sorted(result.maps))}")
    figures.resolve_norm(norm, np.zeros(1))  # a bad norm fails before the folder is claimed
    figures.paper_width(width)
    stems = {name: f"{result.probe}-{name}" + "".join(f"-{a}{i}" for a, i in dict(select or {}).items()) for name in names}
    for name in names:  # the cheap checks of every map (layout, select, log of a signed map) before any claim
        panels = figures.map_panels(result, name, select=select)
        figures.resolve_norm(norm, panels.data, probe=result.probe, name=name)
    targets = [f"{stems[n]}.{ext}" for n in names for ext in (*fmts, "safetensors", "json")]
    folder = prepare_output_dir(out, KIND, overwrite=overwrite)
    manifest = _read_manifest(folder)
    owned: dict[str, Any] = manifest["files"]
    foreign = []
    for fname in targets:
        path = folder / fname
        if path.exists() or path.is_symlink():
            entry = owned.get(fname) or {}
            current = _sha(path.read_bytes()) if path.is_file() and not path.is_symlink() else None
            if current is None or current not in (entry.get("sha256"), entry.get("previous")):
                foreign.append(fname)
    if foreign:
        raise FileExistsError(
            f"{folder} holds {', '.join(sorted(foreign))}, which this export did not write (or which changed since); "
            "exports never replace such files, even with --overwrite: move them away or choose another --out folder")

    # Render everything before writing anything: a failure leaves the files as they were.
    rendered: dict[str, dict[str, bytes]] = {}
    done = Export(folder)
    prov = provenance(result)
    for name in names:
        fig = figures.map_figure(result, name, norm=norm, width=width, select=select, image=image, log_floor=log_floor)
        info = fig.scorescope
        stem = stems[name]
        blobs = {f"{stem}.{fmt}": figures.figure_bytes(fig, fmt, dpi=dpi) for fmt in fmts}
        panels = info["panels"]
        blobs[f"{stem}.safetensors"] = _safetensors_bytes(
            {name: result.maps[name], "panels": torch.from_numpy(np.ascontiguousarray(panels.data))})
        scales = info["scales"]
        sidecar = {
            "map": name,
            "axes": list(result.axes.get(name, ())),
            "shape": list(result.maps[name].shape),
            "dtype": str(result.maps[name].dtype).replace("torch.", ""),
            "select": dict(select or {}),
            "panels": {"rows": panels.row_axis, "row_labels": panels.row_labels, "cols": panels.col_axis,
                       "col_labels": panels.col_labels, "summed_over": list(panels.reduced),
                       "shape": list(panels.data.shape)},
            "colour_scale": {"kind": info["scale"], "requested": norm,
                             "vmin": [s.vmin for s in scales] if info["scale"] == "panel" else scales[0].vmin,
                             "vmax": [s.vmax for s in scales] if info["scale"] == "panel" else scales[0].vmax,
                             "log_floor": scales[0].floor, "log_floor_fraction": log_floor if info["scale"] == "log" else None},
            "colorbar_label": info["label"],
            "arrays": f"{stem}.safetensors",
            "figures": [f"{stem}.{fmt}" for fmt in fmts],
            "width_in": figures.paper_width(width),
            "png_dpi": dpi if "png" in fmts else None,
            "provenance": prov,
        }
        blobs[f"{stem}.json"] = json.dumps(sidecar, indent=1, default=_json_default).encode()
        rendered[name] = blobs
        done.figures[name] = fig

    for name, blobs in rendered.items():
        # Claim the names in the manifest first (with the hash of what is there now), so an interrupted export
        # still owns what it had begun to write.
        for fname, blob in blobs.items():
            path = folder / fname
            old = _sha(path.read_bytes()) if path.is_file() and not path.is_symlink() else None
            owned[fname] = {"sha256": _sha(blob), "previous": old}
        atomic_write_json(folder / MANIFEST, manifest)
        for fname, blob in blobs.items():
            atomic_write(folder / fname, blob)
            owned[fname]["previous"] = None
        atomic_write_json(folder / MANIFEST, manifest)
        done.paths[name] = [folder / f for f in blobs]
    return done


def write_figure(fig: Any, folder: str | Path, stem: str, *, formats: Sequence[str] = FORMATS, dpi: int = 300) -> dict[str, Path]:
    """Write a figure of a tidy frame (:mod:`interp.figures`) as ``<stem>.<fmt>`` for each format into ``folder``.

    Every file is rendered before any is written, then written atomically; returns ``{format: path}``. The caller
    owns ``folder`` (a folder it claimed): same-named files there are replaced.
    """
    fmts = check_formats(formats)
    folder = Path(folder)
    blobs = {fmt: figures.figure_bytes(fig, fmt, dpi=dpi) for fmt in fmts}
    return {fmt: atomic_write(folder / f"{stem}.{fmt}", blob) for fmt, blob in blobs.items()}


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


def read_arrays(path: str | Path) -> dict[str, torch.Tensor]:
    """The arrays of an exported ``.safetensors`` file (the map under its name, and ``panels``)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def length_figure(frame: Any, metric: str = "count_acc", *, train_range: tuple[int, int] | None = None,
                  hue: str = "model", width: str | float = "one-column") -> Any:
    """Length-generalisation curves with binomial 95 % Wilson intervals pooled over seeds.

    ``frame``: tidy rows (``metric``, ``value``, ``k``, ``n`` (images per row), ``seed``, ``hue``) as written by
    ``scorescope clevr track`` / ``evaluate_length``. Per (``hue``, k) the successes of every seed are pooled —
    ``round(value · trials)`` with trials ``n`` for image fractions and ``k · n`` for ``recall`` (objects) — and the
    Wilson interval (:func:`interp.clevr.metrics.wilson_interval`) of the pooled fraction is the band.
    """
    import pandas as pd

    from interp.clevr.metrics import wilson_interval

    df = frame[frame["metric"] == metric] if "metric" in frame.columns else frame.assign(value=frame[metric])
    if df.empty:
        raise ValueError(f"metric {metric!r} is not in the frame; metrics: {sorted(set(frame.get('metric', [])))}")
    rows = []
    for (key, k), part in df.groupby([hue, "k"], sort=True):
        trials = part["n"].astype(int) * (int(k) if metric == "recall" else 1)
        successes = int(sum(round(v * t) for v, t in zip(part["value"], trials)))
        total = int(trials.sum())
        lo, hi = wilson_interval(successes, total)
        rows.append({hue: key, "k": k, "metric": metric, "value": successes / total if total else float("nan"),
                     "lo": lo, "hi": hi, "n": total, "seeds": part["seed"].nunique() if "seed" in part else 1})
    return figures.length_curves(pd.DataFrame(rows), metric, hue=hue, train_range=train_range, width=width)


__all__ = ["Export", "FORMATS", "KIND", "MANIFEST", "check_formats", "export_maps", "git_commit", "length_figure",
           "provenance", "read_arrays", "stack_sites", "write_figure"]
