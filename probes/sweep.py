"""Locality sweeps: sites × noise levels × samples → one tidy DataFrame, resumable at any point.

A sweep is a list of *units* ``(site, t, seed)`` (and CFG branch for the output site). Each unit runs the probes for that site (the output
``"output"``: conditional maps + CPC residual + optionally pixel locality on a grid; a layer: the
feature-space dependence of :mod:`probes.features`) and yields tidy rows. Storage *(ours)*:

* every completed unit is written as one CSV part-file ``parts/<key>.csv`` — written to a temporary
  name, flushed, fsync'd, then ``os.replace``'d into place, so a part is either complete or absent;
* the presence of a part *is* the completion index: a sweep killed at any point (even mid-write) resumes
  by skipping units whose part exists — nothing is recomputed, nothing duplicated;
* ``sweep.json`` records the sweep's identity (model, config hash, conditioning, probe options); resuming
  with different options refuses instead of mixing rows;
* ``results.csv`` (the concatenation, atomically replaced) is rewritten at the end of every run.

Columns: ``model, site, t, metric, value, seed`` then probe-specific indices (``conditioner``,
``map_name``, ``pixel_row``, ...), then metadata (``probe``, ``config_hash``, ...).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from interp import Conditioning, Denoiser
from interp.io import atomic_write, check_settings, prepare_output_dir
from interp.site import resolve_paths
from interp.inputs import as_levels, as_seeds
from interp.results import CORE_COLUMNS, ProbeResult

OUTPUT_SITE = "output"


@dataclass
class SweepConfig:
    """What a sweep computes (stored in ``sweep.json``; a resume must match it)."""

    model: str
    config_hash: str
    sites: list[str]
    levels: list[float]
    seeds: list[int]
    metrics: list[str]
    radius: float
    directions: str
    pixel_stride: int
    conditioning: str
    extra: dict[str, Any] = field(default_factory=dict)


def expand_sites(den: Denoiser, sites: str | Sequence[str]) -> list[str]:
    """Site patterns → exact module paths (``"output"`` stays; globs expand in execution-tree order)."""
    patterns = [s.strip() for s in (sites.split(",") if isinstance(sites, str) else sites) if s.strip()]
    if not patterns:
        raise ValueError("no sites given: use 'output' and/or module paths or globs such as '*attn2'")
    out: list[str] = []
    for p in patterns:
        paths = [OUTPUT_SITE] if p == OUTPUT_SITE else [path for path, _ in resolve_paths(den.unet, p)]
        out += [q for q in paths if q not in out]
    return out


def unit_key(site: str, t: float, seed: int, branch: str = "cond") -> str:
    """Stable file-name-safe key of a unit."""
    raw = f"{site}|{t!r}|{seed}" + ("" if branch == "cond" else f"|{branch}")
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def atomic_write_csv(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` so that readers see the old file or the complete new one, never a part."""
    atomic_write(path, df.to_csv(index=False))


def _conditioning_id(cond: Conditioning) -> str:
    loc = None if cond.locations is None else [[round(float(v), 6) for v in row] for row in cond.locations.tolist()]
    digest = hashlib.sha1(cond.tokens.detach().float().cpu().numpy().tobytes()).hexdigest()[:12]
    return json.dumps({"k": cond.k, "labels": list(cond.labels), "locations": loc, "tokens": digest})


def run_unit(den: Denoiser, cond: Conditioning, site: str, t: float, seed: int, cfg: SweepConfig, branch: str = "cond", **kw: Any) -> pd.DataFrame:
    """All probes of one ``(site, t, seed, branch)`` unit as a tidy frame."""
    from probes.conditional import conditional_locality
    from probes.cpc import cpc_residual
    from probes.features import feature_dependence
    from probes.jacobian import pixel_locality

    results: list[ProbeResult] = []
    radius = cfg.radius if cond.locations is not None else None
    directions: int | str = cfg.directions if cfg.directions == "all" else int(cfg.directions)
    if site == OUTPUT_SITE:
        if "cond" in cfg.metrics:
            results.append(conditional_locality(den, cond, t, [seed], maps=("jvp", "ablation"), directions=directions,
                                                radius=radius, branch=branch, **kw))  # type: ignore[arg-type]
        if "cpc" in cfg.metrics and cond.locations is not None:
            results.append(cpc_residual(den, cond, t, [seed], radius=cfg.radius, branch=branch, **kw))  # type: ignore[arg-type]
        if "pixel" in cfg.metrics:
            results.append(pixel_locality(den, cond, t, [seed], pixels=cfg.pixel_stride, branch=branch, **kw))  # type: ignore[arg-type]
    else:
        if "cond" in cfg.metrics or "cpc" in cfg.metrics:
            results.append(feature_dependence(den, site, cond, t, [seed], directions=directions, radius=radius,
                                              cpc="cpc" in cfg.metrics and cond.locations is not None, keep_channels=False, **kw))
    frames = []
    for r in results:
        f = r.frame()
        if "stat" in f.columns:  # per-seed rows only: the unit *is* one seed
            f = f[f["stat"].isna()].drop(columns="stat")
        f["site"] = site
        f["t"] = t
        f["seed"] = seed
        f["branch"] = branch
        frames.append(f)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CORE_COLUMNS))
    df["model"] = cfg.model
    return df


def locality_sweep(
    model: Denoiser | str,
    cond: Conditioning | None = None,
    *,
    sites: str | Sequence[str] = OUTPUT_SITE,
    t: float | Sequence[float] = (0.1, 0.5, 0.9),
    seeds: int | Sequence[int] = 2,
    out: str | Path | None = None,
    metrics: Sequence[str] = ("cond", "cpc"),
    radius: float = 0.2,
    directions: int | str = 8,
    pixel_stride: int = 8,
    locations: Sequence[Sequence[float]] | None = None,
    prompt: Sequence[str] | None = None,
    branches: Sequence[str] = ("cond",),
    progress: Callable[[str], None] | None = None,
    device: str | None = None,
    overwrite: bool = False,
    **probe_kwargs: Any,
) -> pd.DataFrame:
    """Run (or resume) a sweep and return its tidy frame.

    Args:
        model: a :class:`Denoiser` or a model name for :func:`interp.models.registry.load_model`.
        cond: the conditioning (default: ``locations`` — three well-separated objects — for CLEVR models,
            the phrases ``prompt`` for SDXL models).
        sites: ``"output"`` and/or module paths / globs (``"*attn2"``), a list or a comma-separated string.
        t: noise fractions. seeds: one unit per seed.
        out: folder for part-files, ``sweep.json`` and ``results.csv``; ``None`` keeps everything in memory.
        metrics: subset of ``"cond"`` (conditional maps), ``"cpc"`` (CPC residual), ``"pixel"`` (pixel
            locality on a grid of stride ``pixel_stride``; output site only).
        radius: region / mask radius (normalised units). directions: JVP directions per conditioner.
        branches: CFG branches of the output-site probes: ``"cond"`` and/or ``"guided"`` (the denoiser's
            guidance scale); layer sites read the conditional branch.
        progress: called with a line per unit (``"done"`` / ``"skip"``).
        device: where a model given by name is loaded (default: the GPU when present; ``cuda:LOCAL_RANK``
            under ``torchrun``).
        overwrite: write into a non-empty ``out`` that is not a sweep's folder (nothing in it is deleted).
            A folder holding a sweep is resumed; with other fixed settings it is refused.
        probe_kwargs: passed to every probe (``x0=``, ``shape=``, ``chunk_size=``...).

    Several processes: launched under ``torchrun`` (see :mod:`interp.distributed`) the pending units are split
    across the ranks (``out`` is then required); each writes its parts, rank 0 writes ``sweep.json`` and
    ``results.csv``, and every rank returns the whole table — the same rows and numbers as one process.

    Returns:
        the tidy frame of every unit (resumed units read back from their parts).
    """
    if device is None:
        from interp.distributed import rank_device

        device = rank_device()  # several processes: each on its own GPU
    den, name, cond = _resolve(model, cond, locations, prompt, device=device)
    bad = set(metrics) - {"cond", "cpc", "pixel"}
    if bad or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of ('cond', 'cpc', 'pixel'); got {list(metrics)}")
    levels, seed_list = as_levels(t), as_seeds(seeds)
    site_list = expand_sites(den, sites)
    branch_list = list(branches)
    if not branch_list or set(branch_list) - {"cond", "guided"}:
        raise ValueError(f"branches must be a non-empty subset of ('cond', 'guided'); got {branch_list}")
    cfg = SweepConfig(
        model=name, config_hash=den.metadata()["config_hash"], sites=site_list, levels=levels, seeds=seed_list,
        metrics=sorted(metrics), radius=float(radius), directions=str(directions), pixel_stride=int(pixel_stride),
        conditioning=_conditioning_id(cond),
    )
    from interp.distributed import distributed

    with distributed() as dist:
        return _run_units(den, cond, cfg, site_list, levels, seed_list, branch_list, out, overwrite, progress, dist, probe_kwargs)


def _run_units(den: Denoiser, cond: Conditioning, cfg: SweepConfig, site_list: list[str], levels: list[float],
               seed_list: list[int], branch_list: list[str], out: str | Path | None, overwrite: bool,
               progress: Callable[[str], None] | None, dist: Any, probe_kwargs: dict[str, Any]) -> pd.DataFrame:
    """The unit loop of :func:`locality_sweep`: this rank's pending units, then (rank 0) the merged table."""
    if out is None and dist.world_size > 1:
        raise ValueError(f"out is required on {dist.world_size} processes: the ranks exchange their units as part files")
    parts_dir = None
    if out is not None:
        out = Path(out)
        parts_dir = out / "parts"

        def claim() -> None:
            if not (out / "sweep.json").is_file():  # a sweep's own folder (with or without the marker) resumes
                prepare_output_dir(out, "locality-sweep", overwrite=overwrite)
            parts_dir.mkdir(parents=True, exist_ok=True)
            _check_config(out / "sweep.json", cfg)

        dist.on_main(claim)
    units = [(site, level, seed, branch) for site in site_list for level in levels for seed in seed_list
             for branch in (branch_list if site == OUTPUT_SITE else ["cond"])]

    def part_of(unit: tuple[str, float, int, str]) -> Path | None:
        return parts_dir / f"{unit_key(*unit)}.csv" if parts_dir is not None else None

    def tag_of(unit: tuple[str, float, int, str]) -> str:
        site, level, seed, branch = unit
        return f"{site} t={level} seed={seed}" + ("" if branch == "cond" else f" branch={branch}")

    pending = dist.pending(units, done=lambda u: part_of(u) is not None and part_of(u).exists())
    todo = dist.share(pending)
    if progress and dist.is_main:
        for unit in units:
            if unit not in pending:
                progress(f"skip {tag_of(unit)} (done)")
    fresh: dict[tuple[str, float, int, str], pd.DataFrame] = {}
    for unit in todo:
        site, level, seed, branch = unit
        df = run_unit(den, cond, site, level, seed, cfg, branch=branch, **probe_kwargs)
        df["unit"] = unit_key(*unit)
        part = part_of(unit)
        if part is not None:
            atomic_write_csv(df, part)
            dist.part_written()
        fresh[unit] = df
        if progress:
            progress(f"done {tag_of(unit)}: {len(df)} rows" + (f" (rank {dist.rank})" if dist.world_size > 1 else ""))
    dist.barrier()  # every rank's parts are on disk
    # Read back from the parts (identical dtypes for fresh and resumed units, whichever rank ran them).
    frames = [pd.read_csv(part_of(u)) if parts_dir is not None else fresh[u] for u in units]
    result = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CORE_COLUMNS))
    if out is not None and dist.is_main:
        atomic_write_csv(result, out / "results.csv")
    return result


def read_sweep(out: str | Path) -> pd.DataFrame:
    """Every completed unit of a sweep folder (also of one that was interrupted)."""
    parts = sorted((Path(out) / "parts").glob("*.csv"))
    return pd.concat([pd.read_csv(p) for p in parts], ignore_index=True) if parts else pd.DataFrame(columns=list(CORE_COLUMNS))


def _check_config(path: Path, cfg: SweepConfig) -> None:
    check_settings(path, asdict(cfg), ("model", "config_hash", "metrics", "radius", "directions", "pixel_stride",
                                       "conditioning"), may_change="sites, noise levels and seeds")


def _resolve(model: Denoiser | str, cond: Conditioning | None, locations: Any, prompt: Any, *, device: str = "cpu") -> tuple[Denoiser, str, Conditioning]:
    if isinstance(model, Denoiser):
        if cond is None:
            raise ValueError("pass cond= with a Denoiser (model names build a default conditioning)")
        return model, model.name, cond
    from interp.models.registry import load_model

    loaded = load_model(model, device=device)
    den = loaded.denoiser
    if cond is None:
        cond = loaded.conditioning(locations, prompt)
    return den, loaded.name, cond


def parse_floats(text: str) -> list[float]:
    """``"0.1,0.5,0.9"`` → ``[0.1, 0.5, 0.9]``."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def parse_locations(text: str) -> list[list[float]]:
    """``"0.2,0.3;0.7,0.8"`` → ``[[0.2, 0.3], [0.7, 0.8]]``."""
    pts = [parse_floats(p) for p in text.split(";") if p.strip()]
    if not pts or any(len(p) != 2 for p in pts):
        raise ValueError(f"locations must look like 'x,y;x,y' (normalised), got {text!r}")
    return pts


__all__ = ["SweepConfig", "atomic_write_csv", "expand_sites", "locality_sweep", "read_sweep", "run_unit", "unit_key"]
