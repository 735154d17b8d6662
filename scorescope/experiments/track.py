"""Locality and length generalisation through training *(ours)*: measure every EMA snapshot of a run.

``scorescope clevr track`` reads the EMA pipeline snapshots a run keeps with ``clevr train --snapshot-every``
(:func:`interp.clevr.train.snapshot_folders`) and measures each one, for one or several runs (labelled, e.g.
``exp1`` and ``exp2``), so one table and one figure show how the two develop during training:

* **length generalisation** at the requested counts (:func:`interp.clevr.evaluate.evaluate_length`: DDIM
  samples of ``n`` seeded location sets per ``k``, the same sets at every snapshot): count accuracy, recall,
  precision, placement accuracy, unrequested objects per image (``mean_extra``) and mean detected count, with
  Wilson 95 % intervals (``lo`` / ``hi``; recall over ``k · n`` objects, the others over ``n`` images);
* **pixel-space conditional locality** (:func:`probes.conditional_locality`): the in-region fraction within
  ``radius`` of each conditioner, and the leakage to other conditioners' pixels and to background, of the JVP
  map (``directions`` random Gaussian directions, seeded) and of the ablation map, averaged over the
  conditioners of a scene;
* the **CPC residual** (:func:`probes.cpc_residual`, masks of the same radius) and its region / background parts;
* the **feature-space profile** at a few sites (:func:`scorescope.experiments.feature_profile.feature_profile`
  on the same probe scenes, inputs and seeds: in-region fraction at the layer's resolution, channel sparsity,
  effective number of conditioners), averaged over the scene's conditioners. ``sites=()`` skips it.

The probes use a fixed seeded set of ``probe_scenes`` conditionings of ``probe_k`` objects (valid random
locations, :func:`interp.clevr.render.sample_positions`), forward-process inputs noised from a rendered scene
with objects at those locations (x₀), ``probe_seeds`` noise seeds, at each noise fraction in ``levels``
(default a high and a mid level, 0.9 and 0.5): the same inputs at every snapshot, so the curves are paired.
Each (scene, seed, t) is its own row.

Output folder (claimed with :func:`interp.io.prepare_output_dir`, kind ``clevr-track``):

* ``track.json`` — the fixed settings; a rerun with other fixed settings is refused naming the difference
  (:func:`interp.io.check_settings`). Runs may be added and sites may change (new units are computed); a
  label that pointed at another run folder is refused;
* ``parts/<label>__step-NNNNNNN.json`` — one per finished (run, snapshot), written atomically: its presence
  *is* the completion index, so rerunning while training goes on computes only the new snapshots. It records
  a fingerprint of the snapshot's weights, and a snapshot whose weights changed since (a run trained again
  into the same folder) is refused rather than mixed with the old numbers;
* ``parts/<label>__step-NNNNNNN__site-<slug>.json`` — the feature profile of one site of one snapshot (the
  pending sites of a snapshot are computed in one call, then written one part each);
* ``results.csv`` / ``results.json`` — the tidy table (:data:`COLUMNS`) of every unit of the given runs
  finished in the folder so far, and ``track.png`` — the figure (:func:`figure`).

``every=N`` measures only the snapshots at multiples of ``N`` steps: a coarse pass over a long run first, the
rest later (not a fixed setting: the units are the same).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interp.io import atomic_write, atomic_write_json, check_settings, check_writable_file, prepare_output_dir

KIND = "clevr-track"
"""Marker kind of the output folder."""

COLUMNS: tuple[str, ...] = (
    "model", "step", "family", "metric", "map_name", "site", "k", "t", "scene", "seed", "n", "value", "lo", "hi",
)
"""Columns of the tidy table. ``family``: ``length`` / ``locality`` / ``cpc`` / ``feature``; ``map_name``: the
conditional-locality map (``jvp`` / ``ablation``, empty otherwise); ``site``: the feature site (``output`` for
the pixel-space probes, empty for length rows); ``k``: requested count (length) or the probe scenes' count;
``t``: noise fraction (NaN for length rows); ``scene``: probe scene index (-1 for length rows); ``seed``: the
evaluation seed (length) or the forward-process noise seed (probes); ``n``: scenes per count (length);
``lo`` / ``hi``: Wilson 95 % interval of a fraction (NaN otherwise)."""

LENGTH_METRICS: tuple[str, ...] = ("count_acc", "recall", "precision", "placement_acc", "mean_extra", "mean_count")
LOCALITY_METRICS: tuple[str, ...] = ("in_region", "leak_other", "leak_background")
CPC_METRICS: tuple[str, ...] = ("cpc_residual", "cpc_residual_regions", "cpc_residual_background")

#: The feature-profile module (another part of the application); used only when it is installed.
FEATURE_MODULE = "scorescope.experiments.feature_profile"

#: The CLI's default feature sites: the mid block's and one up block's cross-attention of the CLEVR U-Nets
#: (``global`` / ``global-coord`` architectures; the local U-Net names its layers differently).
DEFAULT_SITES: tuple[str, ...] = (
    "mid_block.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
)

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class TrackError(ValueError):
    """A bad setting; ``option`` is the ``scorescope clevr track`` option that sets it."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class TrackConfig:
    """The fixed settings of a track folder (a rerun must match them; :data:`FIXED`).

    Attributes:
        counts: requested object counts of the length evaluation. n: scenes per count. seed: seeds the
            requested locations, the sampling noise, the probe scenes and the probe noise. steps: DDIM steps.
        probe_k: objects per probe scene. probe_scenes: number of probe scenes. probe_seeds: noise seeds per
            scene. levels: noise fractions of the probes. radius: in-region / CPC mask radius (normalised
            units). directions: random directions of the JVP map.
    """

    counts: tuple[int, ...] = (4, 6, 8)
    n: int = 64
    seed: int = 0
    steps: int = 25
    probe_k: int = 3
    probe_scenes: int = 2
    probe_seeds: int = 2
    levels: tuple[float, ...] = (0.9, 0.5)
    radius: float = 0.2
    directions: int = 4

    def settings(self) -> dict[str, Any]:
        """JSON form (tuples as lists), as stored in ``track.json``."""
        return json.loads(json.dumps(asdict(self)))


FIXED: tuple[str, ...] = tuple(TrackConfig.__dataclass_fields__) + ("match_radius", "detector", "sampler")


def check_config(cfg: TrackConfig) -> TrackConfig:
    """Refuse settings that would fail late or measure nothing; :class:`TrackError` names the option."""
    from interp.clevr.evaluate import OptionError, check_eval_options, parse_counts
    from interp.clevr.render import MAX_OBJECTS

    try:
        ks = parse_counts(list(cfg.counts))
    except ValueError as err:
        raise TrackError(str(err), "--counts") from None
    try:
        check_eval_options(n=cfg.n, seed=cfg.seed, steps=cfg.steps)
    except OptionError as err:
        raise TrackError(str(err), err.option) from None
    if not 1 <= cfg.probe_k <= MAX_OBJECTS:
        raise TrackError(f"probe_k must be in 1…{MAX_OBJECTS} objects (--probe-k), got {cfg.probe_k}", "--probe-k")
    for name, option in (("probe_scenes", "--probe-scenes"), ("probe_seeds", "--probe-seeds"), ("directions", "--directions")):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TrackError(f"{name} must be an integer >= 1 ({option}), got {v!r}", option)
    if not cfg.levels or any(not (isinstance(t, (int, float)) and 0 < t <= 1) for t in cfg.levels):
        raise TrackError(f"levels must be noise fractions in (0, 1] (--levels), got {list(cfg.levels)!r}", "--levels")
    if len(set(cfg.levels)) != len(cfg.levels):
        raise TrackError(f"levels repeat a noise fraction (--levels), got {list(cfg.levels)!r}", "--levels")
    if not (isinstance(cfg.radius, (int, float)) and math.isfinite(cfg.radius) and cfg.radius > 0):
        raise TrackError(f"radius must be a finite number > 0 (--radius, normalised units), got {cfg.radius!r}", "--radius")
    return TrackConfig(**{**asdict(cfg), "counts": tuple(ks), "levels": tuple(float(t) for t in cfg.levels),
                          "radius": float(cfg.radius)})


# ------------------------------------------------------------------------------------------------- runs
def parse_runs(specs: Sequence[str | Path]) -> dict[str, Path]:
    """``["exp1=/runs/exp1", "/runs/exp2"]`` → ``{"exp1": Path(...), "exp2": Path(...)}`` (label: folder name).

    Each run folder must exist and hold at least one snapshot. Raises :class:`TrackError` (``--run``) for an
    empty list, a label that is not letters / digits / ``._-`` (starting with a letter or digit), a repeated
    label, a missing folder or a run without snapshots.
    """
    from interp.clevr.train import SNAPSHOT_DIR, snapshot_folders

    if not specs:
        raise TrackError("give at least one --run (a training run folder, or LABEL=FOLDER)", "--run")
    runs: dict[str, Path] = {}
    for spec in specs:
        text = str(spec)
        label, eq, folder = text.partition("=")
        if not eq:
            folder, label = text, Path(text.rstrip("/")).name
        if not _LABEL.fullmatch(label):
            raise TrackError(f"bad --run {text!r}: write LABEL=FOLDER with a label of letters, digits and '._-' "
                             f"(e.g. exp1=/work/runs/exp1), or just FOLDER", "--run")
        if label in runs:
            raise TrackError(f"the label {label!r} is given twice in --run; label each run differently (LABEL=FOLDER)", "--run")
        path = Path(folder)
        if not path.is_dir():
            raise TrackError(f"--run {text!r}: {path} is not a folder (expected a `clevr train` run folder)", "--run")
        if not snapshot_folders(path):
            raise TrackError(f"--run {text!r}: {path} holds no snapshots in {SNAPSHOT_DIR}/ (train it with "
                             "`scorescope clevr train --snapshot-every N`)", "--run")
        runs[label] = path
    return runs


def parse_sites(spec: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` / ``["a", "b"]`` → unique site names in order; ``None``, ``""`` or ``"none"`` → ``[]``."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    if items == ["none"]:
        return []
    return list(dict.fromkeys(items))


def feature_profile_available() -> bool:
    """Whether :data:`FEATURE_MODULE` is installed."""
    return importlib.util.find_spec(FEATURE_MODULE) is not None


# ------------------------------------------------------------------------------------------------ units
@dataclass(frozen=True)
class Unit:
    """One piece of work: a run's snapshot (``site`` ``None``: length + pixel probes) or one feature site of it."""

    label: str
    step: int
    folder: Path
    site: str | None = None

    @property
    def stem(self) -> str:
        base = f"{self.label}__step-{self.step:07d}"
        return base if self.site is None else f"{base}__site-{site_slug(self.site)}"

    def describe(self) -> str:
        return f"{self.label} step {self.step}" + ("" if self.site is None else f" site {self.site}")


def site_slug(site: str) -> str:
    """File-name-safe form of a site (readable part + 8 hex digits of its hash: slugs of two sites may collide)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", site) + "-" + hashlib.sha1(site.encode()).hexdigest()[:8]


def check_every(every: int | None) -> int | None:
    """``None`` (every snapshot) or an integer >= 1; :class:`TrackError` (``--every``) otherwise."""
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise TrackError(f"every must be an integer >= 1 (--every: measure the snapshots at multiples of it), got {every!r}", "--every")
    return every


def plan_units(runs: dict[str, Path], sites: Sequence[str] = (), every: int | None = None) -> list[Unit]:
    """Every unit of the snapshots present now, by run then step (the snapshot unit before its site units).

    ``every``: keep only the snapshots whose step is a multiple of it (a coarse pass first; a later run without
    it fills in the rest).
    """
    from interp.clevr.train import snapshot_folders

    check_every(every)
    units = []
    for label, run in runs.items():
        for step, folder in snapshot_folders(run):
            if every is not None and step % every:
                continue
            units.append(Unit(label, step, folder))
            units.extend(Unit(label, step, folder, s) for s in sites)
    return units


def fingerprint(folder: Path) -> str:
    """SHA-1 of a snapshot's U-Net and encoder weight files (identifies the numbers it was measured on)."""
    h = hashlib.sha1()
    for part in ("unet", "location_encoder"):
        for f in sorted((Path(folder) / part).glob("*.safetensors")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def pending(out: str | Path, units: Sequence[Unit]) -> list[Unit]:
    """The units of ``units`` whose part file is not in ``out/parts`` yet."""
    parts = Path(out) / "parts"
    return [u for u in units if not (parts / f"{u.stem}.json").exists()]


# ------------------------------------------------------------------------------------------- measuring
def probe_scenes(cfg: TrackConfig, size: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    """The probes' fixed scenes: ``[(locations (k, 2), x0 (3, size, size) in [-1, 1]), ...]``, seeded by ``cfg.seed``."""
    from interp.clevr.render import random_scene, render, sample_positions

    out = []
    for i in range(cfg.probe_scenes):
        rng = np.random.default_rng([cfg.seed, cfg.probe_k, i, 13])
        loc = sample_positions(rng, cfg.probe_k)
        scene = random_scene(rng, [cfg.probe_k], positions=[loc.astype(np.float32)])
        x0 = torch.from_numpy(render(scene, size=size).to_model_range()[0]).float()
        out.append((loc, x0))
    return out


def probe_seeds(cfg: TrackConfig) -> list[int]:
    """Forward-process noise seeds of the probes (the same at every snapshot)."""
    return [cfg.seed * 1000 + i for i in range(cfg.probe_seeds)]


def _row(label: str, step: int, family: str, metric: str, value: float, **kw: Any) -> dict[str, Any]:
    row = {"model": label, "step": step, "family": family, "metric": metric, "map_name": "", "site": "", "k": -1,
           "t": float("nan"), "scene": -1, "seed": -1, "n": 0, "value": float(value), "lo": float("nan"), "hi": float("nan")}
    row.update(kw)
    return row


def length_rows(label: str, step: int, per_k: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Tidy rows of ``evaluate_length``'s ``per_k`` with Wilson intervals of the fractions."""
    from interp.clevr.metrics import wilson_interval

    rows = []
    for stats in per_k:
        k, n = int(stats["k"]), int(stats["n"])
        trials = {"count_acc": n, "recall": k * n, "placement_acc": n}
        for metric in LENGTH_METRICS:
            value = float(stats.get(metric, float("nan")))
            lo = hi = float("nan")
            if metric in trials and math.isfinite(value) and trials[metric] > 0:
                # the fractions are exact ratios of integers, so rounding recovers the success count
                lo, hi = wilson_interval(round(value * trials[metric]), trials[metric])
            rows.append(_row(label, step, "length", metric, value, k=k, seed=seed, n=n, lo=lo, hi=hi))
    return rows


def probe_rows(label: str, step: int, den: Any, pipe: Any, cfg: TrackConfig) -> list[dict[str, Any]]:
    """In-region / leakage fractions (JVP and ablation maps) and CPC residuals, one row per (scene, seed, t)."""
    import probes

    size = int(pipe.unet.config.sample_size)
    rows = []
    for i, (loc, x0) in enumerate(probe_scenes(cfg, size)):
        cond = pipe.conditioning(loc)
        for s in probe_seeds(cfg):
            cl = probes.conditional_locality(den, cond, t=list(cfg.levels), seeds=[s], x0=x0, maps=("jvp", "ablation"),
                                             directions=cfg.directions, radius=cfg.radius).frame()
            cl = cl[cl.metric.isin(LOCALITY_METRICS)]
            # the mean over the scene's conditioners: each conditioner's fraction of its own map's mass
            for (metric, map_name, t), value in cl.groupby(["metric", "map_name", "t"]).value.mean().items():
                rows.append(_row(label, step, "locality", metric, value, map_name=map_name, site="output", k=cfg.probe_k,
                                 t=float(t), scene=i, seed=s))
            cp = probes.cpc_residual(den, cond, t=list(cfg.levels), seeds=[s], x0=x0, radius=cfg.radius).frame()
            cp = cp[cp.metric.isin(CPC_METRICS) & cp.seed.notna()]
            for r in cp.itertuples():
                rows.append(_row(label, step, "cpc", r.metric, r.value, site="output", k=cfg.probe_k, t=float(r.t),
                                 scene=i, seed=s))
    return rows


def feature_rows(label: str, step: int, den: Any, pipe: Any, cfg: TrackConfig, sites: Sequence[str],
                 profile: Callable[..., Any]) -> dict[str, list[dict[str, Any]]]:
    """The feature profile of ``sites`` on the probe scenes, ``{site: rows}``, one row per (scene, seed, t, metric).

    ``profile(den, cond, sites=..., t=..., seeds=..., radius=..., directions=..., x0=...)`` returns a frame with
    ``site, t, seed, metric, value`` (per conditioner for the per-conditioner metrics); rows are averaged over
    the scene's conditioners like the pixel-space probes, NaN entries (a conditioner the layer does not see)
    left out of the mean. One call serves every site (one JVP pass per direction chunk gives every layer).
    """
    size = int(pipe.unet.config.sample_size)
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in sites}
    for i, (loc, x0) in enumerate(probe_scenes(cfg, size)):
        frame = profile(den, pipe.conditioning(loc), sites=list(sites), t=list(cfg.levels), seeds=probe_seeds(cfg),
                        radius=cfg.radius, directions=cfg.directions, x0=x0)
        unknown = set(frame.site) - set(sites)
        if unknown:
            raise ValueError(f"the feature profile returned rows for sites {sorted(unknown)} that were not asked for")
        means = frame.groupby(["site", "t", "seed", "metric"], sort=True).value.mean()
        for (site, t, seed, metric), value in means.items():
            rows[site].append(_row(label, step, "feature", str(metric), float(value), site=site, k=cfg.probe_k,
                                   t=float(t), scene=i, seed=int(seed)))
    missing = [s for s, r in rows.items() if not r]
    if missing:
        raise ValueError(f"the feature profile returned no rows for sites {missing}")
    return rows


# ------------------------------------------------------------------------------------------------- run
@dataclass
class TrackResult:
    """What :func:`run_track` did: the table, the units run and resumed, the files written, the wall time."""

    frame: Any
    ran: list[Unit] = field(default_factory=list)
    skipped: list[Unit] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0
    compute_s: float = 0.0


def _nan_to_none(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def read_parts(out: str | Path) -> Any:
    """The tidy table (:data:`COLUMNS`) of every finished unit under ``out/parts`` (also while a run goes on)."""
    import pandas as pd

    rows = []
    for p in sorted((Path(out) / "parts").glob("*.json")):
        rows.extend(json.loads(p.read_text())["rows"])
    return _frame(rows)


def _frame(rows: Sequence[dict[str, Any]]) -> Any:
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    for c in ("value", "lo", "hi", "t"):
        frame[c] = frame[c].astype(float)
    for c in ("step", "k", "scene", "seed", "n"):
        frame[c] = frame[c].astype(int)
    return frame.sort_values(["model", "step", "family", "metric", "map_name", "site", "k", "t", "scene", "seed"],
                             kind="stable").reset_index(drop=True)


def _check_runs(path: Path, runs: dict[str, Path]) -> dict[str, str]:
    """Merge ``runs`` into the labels recorded at ``path``; a label that named another folder is refused."""
    known: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    for label, folder in runs.items():
        old = known.get(label)
        if old is not None and Path(old).resolve() != folder.resolve():
            raise TrackError(f"the label {label!r} measured {old} in this --out folder, now {folder}: give this run "
                             "another label (LABEL=FOLDER) or use another --out", "--run")
        known[label] = str(folder.resolve())
    atomic_write_json(path, known)
    return known


def prepare(out: str | Path, cfg: TrackConfig, runs: dict[str, Path], *, overwrite: bool = False) -> Path:
    """Claim ``out`` and record (or check) its settings and run labels; returns the folder."""
    from interp.clevr.detect import DetectorConfig
    from interp.clevr.metrics import MATCH_RADIUS

    settings = {**cfg.settings(), "match_radius": MATCH_RADIUS, "detector": dict(DetectorConfig().__dict__),
                "sampler": "ddim"}
    settings = json.loads(json.dumps(settings))
    try:
        out = prepare_output_dir(out, KIND, overwrite=overwrite)
    except FileExistsError as err:
        raise TrackError(str(err), "--out") from None
    try:
        check_settings(out / "track.json", settings, FIXED, may_change="the runs and the feature sites")
    except ValueError as err:
        raise TrackError(str(err), "--out") from None
    _check_runs(out / "runs.json", runs)
    (out / "parts").mkdir(exist_ok=True)
    return out


def run_track(
    runs: dict[str, Path] | Sequence[str],
    out: str | Path,
    cfg: TrackConfig = TrackConfig(),
    *,
    sites: Sequence[str] = (),
    every: int | None = None,
    json_path: str | Path | None = None,
    figure_path: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
    profile: Callable[..., Any] | None = None,
) -> TrackResult:
    """Measure every snapshot of every run not measured yet in ``out``; write the table and the figure.

    Args:
        runs: ``{label: run folder}`` or ``--run`` strings (:func:`parse_runs`).
        out: the track folder (see the module docstring). cfg: fixed settings (:class:`TrackConfig`).
        sites: feature sites for the feature profile (needs :data:`FEATURE_MODULE` unless ``profile`` is given).
        every: measure only the snapshots whose step is a multiple of it (default: all); the table and figure
            still show every unit measured so far in ``out``.
        json_path / figure_path: also write the summary JSON (settings, rows, machine, wall times) / the figure
            there (atomically), e.g. under ``docs/bench/``.
        overwrite: claim a non-empty folder that is not a track folder (nothing in it is deleted).
        device: where the models run (default: CUDA when present). batch_size: scenes per sampling batch.
        progress: called with one line per unit. profile: the feature-profile function (default: the module's).

    Raises:
        TrackError: a ``ValueError`` whose ``option`` names the option at fault (bad settings, an ``out``
            holding other fixed settings or not a track folder, a relabelled run, feature sites without the
            feature-profile module, an unwritable ``json_path`` / ``figure_path``, a snapshot whose weights
            changed since it was measured).
    """
    from interp.clevr.evaluate import evaluate_length
    from interp.clevr.metrics import MATCH_RADIUS
    from interp.models.registry import load_model
    from scorescope.experiments.locality_sweep import machine

    t0 = time.perf_counter()
    cfg = check_config(cfg)
    runs = parse_runs([f"{k}={v}" for k, v in runs.items()] if isinstance(runs, dict) else runs)
    sites = parse_sites(sites)
    check_every(every)
    if sites and profile is None:
        if not feature_profile_available():
            raise TrackError(f"feature sites {sites} need {FEATURE_MODULE}, which is not installed; pass --sites none", "--sites")
        profile = importlib.import_module(FEATURE_MODULE).feature_profile
    for path, option in ((json_path, "--json"), (figure_path, "--figure")):
        if path is not None:
            try:
                check_writable_file(path, what=f"{option} file")
            except ValueError as err:
                raise TrackError(str(err), option) from None
    out = prepare(out, cfg, runs, overwrite=overwrite)
    parts = out / "parts"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = TrackResult(frame=None)
    prints: dict[Path, str] = {}
    units = plan_units(runs, sites, every)
    for folder in dict.fromkeys(u.folder for u in units):
        prints[folder] = fingerprint(folder)
    todo: list[Unit] = []
    for unit in units:
        part = parts / f"{unit.stem}.json"
        if not part.exists():
            todo.append(unit)
            continue
        data = json.loads(part.read_text())
        if data["fingerprint"] != prints[unit.folder]:
            raise TrackError(f"{unit.describe()}: the weights in {unit.folder} differ from those measured in {part} "
                             "(was the run trained again?); use another --out folder", "--out")
        result.skipped.append(unit)
        result.compute_s += float(data.get("wall_s", 0.0))
        if progress:
            progress(f"skip {unit.describe()} (done)")
    for folder in dict.fromkeys(u.folder for u in todo):
        here = [u for u in todo if u.folder == folder]
        model = load_model(str(folder), device=device)  # one snapshot in memory at a time
        pipe, den = model.pipeline, model.denoiser

        def finish(unit: Unit, rows: list[dict[str, Any]], wall: float) -> None:
            record = {"unit": {"label": unit.label, "step": unit.step, "site": unit.site, "folder": str(unit.folder)},
                      "fingerprint": prints[unit.folder], "wall_s": round(wall, 3),
                      "rows": [{c: _nan_to_none(v) for c, v in r.items()} for r in rows]}
            atomic_write_json(parts / f"{unit.stem}.json", record)
            result.ran.append(unit)
            result.compute_s += wall
            if progress:
                progress(f"done {unit.describe()} ({wall:.1f} s)" + _headline(rows, cfg))

        for unit in (u for u in here if u.site is None):
            u0 = time.perf_counter()
            res = evaluate_length(pipe, list(cfg.counts), n=cfg.n, seed=cfg.seed, steps=cfg.steps, batch_size=batch_size,
                                  radius=MATCH_RADIUS, model_name=unit.label, keep_images=1)
            rows = length_rows(unit.label, unit.step, res["per_k"], cfg.seed)
            rows += probe_rows(unit.label, unit.step, den, pipe, cfg)
            finish(unit, rows, time.perf_counter() - u0)
        site_units = [u for u in here if u.site is not None]
        if site_units:
            u0 = time.perf_counter()
            per_site = feature_rows(site_units[0].label, site_units[0].step, den, pipe, cfg,
                                    [u.site for u in site_units], profile)
            wall = (time.perf_counter() - u0) / len(site_units)  # one call served them all: share its time
            for u in site_units:
                finish(u, per_site[u.site], wall)
    frame = read_parts(out)
    frame = frame[frame.model.isin(list(runs))].reset_index(drop=True)
    result.frame = frame
    result.paths["csv"] = atomic_write(out / "results.csv", frame.to_csv(index=False))
    summary = {
        "settings": json.loads((out / "track.json").read_text()),
        "runs": {k: str(v) for k, v in runs.items()},
        "sites": sites,
        "snapshots": {label: sorted({u.step for u in plan_units({label: runs[label]})}) for label in runs},
        "rows": [{c: _nan_to_none(v) for c, v in r.items()} for r in frame.to_dict("records")],
        "machine": dict(machine(), device=device, loadavg_end=list(os.getloadavg())),
        "units": {"ran": len(result.ran), "skipped": len(result.skipped)},
        "unit_wall_s": _unit_walls(out, list(runs)),
        "compute_s": round(result.compute_s, 1),
        "out": str(out),
    }
    if len(frame):
        result.paths["figure"] = figure(frame, out / "track.png")
        if figure_path is not None:
            result.paths["figure_copy"] = atomic_write(figure_path, result.paths["figure"].read_bytes())
    result.wall_s = time.perf_counter() - t0
    summary["wall_s"] = round(result.wall_s, 1)
    result.paths["json"] = atomic_write_json(out / "results.json", summary)
    if json_path is not None:
        result.paths["json_copy"] = atomic_write_json(json_path, summary)
    return result


def _unit_walls(out: Path, labels: Sequence[str]) -> list[dict[str, Any]]:
    """``[{"model", "step", "site", "wall_s"}, ...]`` of the finished units of ``labels`` (compute time each)."""
    walls = []
    for p in sorted((out / "parts").glob("*.json")):
        data = json.loads(p.read_text())
        u = data["unit"]
        if u["label"] in labels:
            walls.append({"model": u["label"], "step": u["step"], "site": u["site"], "wall_s": data["wall_s"]})
    return walls


def _headline(rows: Sequence[dict[str, Any]], cfg: TrackConfig) -> str:
    """``: recall k=6 0.42, in_region(jvp, t=0.9) 0.31`` — one look at a finished unit."""
    bits = []
    for r in rows:
        if r["family"] == "length" and r["metric"] == "recall":
            bits.append(f"recall k={r['k']} {r['value']:.2f}")
    inr = [r["value"] for r in rows if r["family"] == "locality" and r["metric"] == "in_region" and r["map_name"] == "jvp"
           and r["t"] == cfg.levels[0]]
    if inr:
        bits.append(f"in_region(jvp, t={cfg.levels[0]:g}) {np.mean(inr):.2f}")
    return (": " + ", ".join(bits)) if bits else ""


# ---------------------------------------------------------------------------------------------- figure
def _short_site(site: str) -> str:
    """``up_blocks.1.attentions.0.transformer_blocks.0.attn2`` → ``up1.attn0``; ``mid_block.attentions.0...`` → ``mid.attn0``."""
    s = re.sub(r"\.transformer_blocks\.0\.attn2$", "", site)
    s = re.sub(r"^(down|up)_blocks\.(\d+)\.", r"\1\2.", s)
    s = re.sub(r"^mid_block\.", "mid.", s)
    return re.sub(r"attentions\.(\d+)", r"attn\1", s)


def figure(frame: Any, path: str | Path) -> Path:
    """Locality and length generalisation against training step, every model in one figure (written atomically).

    Top row: in-region fraction of the JVP map and the CPC residual (mean over probe scenes and seeds, band:
    ± one standard deviation), one line per (model, t); a third panel shows the feature-space in-region fraction
    at the highest noise level per (model, site) when the frame holds feature rows. Bottom row: count accuracy, recall and placement accuracy,
    one line per (model, k), bands: Wilson 95 % intervals.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from interp.clevr.evaluate import save_figure

    models = list(dict.fromkeys(frame["model"]))
    colours = {m: f"C{i}" for i, m in enumerate(models)}
    feat = frame[frame.family == "feature"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]

    def mean_band(ax: Any, sub: Any, by: str, label_of: Callable[[Any], str], model: str) -> None:
        for j, (key, g) in enumerate(sub.groupby(by, sort=True)):
            stats = g.groupby("step").value.agg(["mean", "std"]).fillna(0.0)
            x = stats.index.to_numpy()
            ax.plot(x, stats["mean"], styles[j % len(styles)], marker=markers[j % len(markers)], ms=3,
                    color=colours[model], label=f"{model} {label_of(key)}")
            ax.fill_between(x, stats["mean"] - stats["std"], stats["mean"] + stats["std"], color=colours[model], alpha=0.12)

    top = [
        ("in-region fraction (JVP map)", frame[(frame.family == "locality") & (frame.metric == "in_region") & (frame.map_name == "jvp")]),
        ("CPC residual", frame[(frame.family == "cpc") & (frame.metric == "cpc_residual")]),
    ]
    for ax, (title, sub) in zip(axes[0][:2], top):
        for m in models:
            mean_band(ax, sub[sub.model == m], "t", lambda t: f"t={t:g}", m)
        ax.set_title(title)
    ax = axes[0][2]
    if len(feat):
        metric = "in_region" if "in_region" in set(feat.metric) else sorted(feat.metric.unique())[0]
        sub = feat[feat.metric == metric]
        for m in models:
            mean_band(ax, sub[(sub.model == m) & (sub.t == sub.t.max())], "site", _short_site, m)
        ax.set_title(f"feature {metric} (t={sub.t.max():g})")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no feature profile", ha="center", va="center", color="0.5")
    length = frame[frame.family == "length"]
    for ax, metric in zip(axes[1], ("count_acc", "recall", "placement_acc")):
        sub = length[length.metric == metric]
        for m in models:
            for j, (k, g) in enumerate(sub[sub.model == m].groupby("k", sort=True)):
                g = g.sort_values("step")
                ax.plot(g.step, g.value, styles[j % len(styles)], marker=markers[j % len(markers)], ms=3,
                        color=colours[m], label=f"{m} k={k}")
                ax.fill_between(g.step, g.lo, g.hi, color=colours[m], alpha=0.12)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(metric.replace("_", " ") + " (Wilson 95 %)")
    for row in axes:
        for ax in row:
            if ax.axison:
                ax.set_xlabel("training step")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
    fig.suptitle("locality and length generalisation through training")
    return save_figure(fig, path)


__all__ = [
    "COLUMNS", "FIXED", "KIND", "TrackConfig", "TrackError", "TrackResult", "Unit", "check_config", "check_every", "feature_profile_available",
    "figure", "fingerprint", "parse_runs", "parse_sites", "pending", "plan_units", "prepare", "probe_scenes",
    "probe_seeds", "read_parts", "run_track",
]
