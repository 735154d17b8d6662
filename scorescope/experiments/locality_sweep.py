"""Does enforcing locality inside a trained network restore length generalisation? (SCIENCE.md §4, ours)

``scorescope intervene locality-sweep`` runs the CLEVR length-generalisation evaluation
(:func:`interp.clevr.evaluate.evaluate_length`) once per *intervention* and requested count ``k``, each inside
``interventions.apply(pipe.unet, *edits)``. The sampling loop announces every row's
:class:`~interp.Conditioning`, so an edit inside the network knows where each requested object is.

The intervention list (:func:`plan_interventions`; every entry has a stable name used in the table, in
``--only`` and in the part files):

* ``unpatched`` — the swept model as it is (``kind = reference``), and ``ref:<model>`` — other models
  unpatched (by default exp1 and exp3 when the swept model is exp2);
* ``mask:<layer>:r<R>`` — distance-masked cross-attention (:class:`interventions.MaskCrossAttention`) at one
  ``attn2`` layer; ``mask:<group>:r<R>`` at a group: ``down`` / ``mid`` / ``up`` blocks, ``lowres`` (layers
  whose query grid is coarser than the finest one) / ``hires``, ``all``. Each again with the suffix
  ``:early`` — only the high-noise half of the DDIM steps (``0 … ceil(steps / 2) − 1``), where the
  conditioners set the layout;
* ``compose:<group>:r<R>`` — feature-space composition (:class:`interventions.Compose`) at every ``attn2``
  output of a group; ``compose-from:<layer>:r<R>`` at that layer and every later one *in execution order*
  (``compose:all`` is the curve's first point: from the first layer on). This locates where locality must be
  enforced: if the trunk after a composed layer re-globalises, recall rises only once L is late enough;
* ``compose-block:<block>:r<R>`` — composition of the *whole hidden state* at one trunk block's output
  (``mid_block``, ``up_blocks.i``), not of a cross-attention increment. Composing a block's full output
  overwrites the composed row, so composing several blocks equals composing the last of them; each block is
  therefore its own entry. After the last up block only ``conv_norm_out`` (GroupNorm: image-wide statistics),
  SiLU and ``conv_out`` remain. Tests the diagnosis that after a composed *layer* the rest of the trunk (its
  residual stream, self-attention, GroupNorm'd resnets, the down path's skip connections) re-globalises;
* ``scores:r<R>`` — score-space composition (:class:`interventions.ComposeScores`; ``kind = baseline``).

A group whose layer set equals an earlier entry of the same family (``mask:mid`` when the mid block has one
layer) is left out rather than computed twice.

Output folder (claimed with :func:`interp.io.prepare_output_dir`, kind ``intervene-locality-sweep``):

* ``sweep.json`` — the fixed settings (model, weights hash, n, seed, DDIM steps, match radius, detector);
  resuming with other fixed settings is refused, naming the difference. Counts, radii, references and
  ``--only`` may change between runs: new units are added, finished ones are kept;
* ``parts/<slug>__k<k>.json`` (+ ``.npy`` of the kept samples) — one per finished (intervention, k),
  each written atomically, the ``.npy`` first: the JSON's presence *is* the completion index, so an
  interrupted sweep resumes without recomputing anything (read partial results with :func:`read_parts`);
* several processes (``torchrun --nproc_per_node=N scorescope intervene locality-sweep ...``,
  :mod:`interp.distributed`): rank 0 claims the folder and checks the settings, the pending (intervention, k)
  units are split across the ranks, each on its own device, and rank 0 writes the table and figures below
  from the parts — the same table as one process;
* ``results.csv`` — the tidy table (:data:`COLUMNS`), ``heatmap.png`` (intervention × k of recall and of
  count accuracy), ``from_layer.png`` (recall against the first composed layer), ``samples/<slug>.png``
  (one row per k).

Binomial 95 % intervals are Wilson intervals (:func:`interp.clevr.metrics.wilson_interval`): count accuracy
and placement accuracy over images, recall over requested objects (``k · n`` trials; objects in one image
are not independent, so the recall interval is somewhat too narrow).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import io
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch

from interp.io import atomic_write, atomic_write_json, check_settings, check_writable_file, prepare_output_dir

KIND = "intervene-locality-sweep"
"""Marker kind of the output folder."""

COLUMNS: tuple[str, ...] = (
    "intervention", "kind", "sites", "steps", "radius", "k", "n",
    "count_acc", "count_acc_lo", "count_acc_hi",
    "recall", "recall_lo", "recall_hi",
    "precision",
    "placement_acc", "placement_acc_lo", "placement_acc_hi",
    "mean_extra", "mean_count",
)
"""Columns of the tidy table, in order (``*_lo`` / ``*_hi``: Wilson 95 % interval)."""

KINDS = ("reference", "baseline", "layer")

#: Fixed settings of a sweep folder: a resume must match them.
FIXED = ("model", "config_hash", "n", "seed", "steps", "match_radius", "detector", "guidance_scale")


# ----------------------------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class Layer:
    """One cross-attention layer: module ``path``, a short ``name`` for tables, its query grid ``side``."""

    path: str
    name: str
    side: int


def short_name(path: str) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` → ``down1.0``; ``mid_block...`` → ``mid``."""
    s = re.sub(r"\.transformer_blocks\.0\.attn2$", "", path)
    s = re.sub(r"^(down|up)_blocks\.(\d+)\.attentions\.(\d+)$", r"\1\2.\3", s)
    s = re.sub(r"^mid_block\.attentions\.0$", "mid", s)
    return s


def attn2_layers(pipe: Any) -> list[Layer]:
    """The pipeline's ``*attn2`` layers in *execution* order, each with its query grid side.

    Module-tree order (``down, up, mid`` in diffusers' U-Net) is not execution order, and "from layer L
    onward" needs the latter; so one forward of a one-object scene records the order in which the layers
    run and the number of queries ``N = side²`` each receives (``(B, N, C)`` hidden states).
    """
    from interp.hooks import HookSet
    from interp.site import resolve_paths

    unet = pipe.unet
    paths = resolve_paths(unet, "*attn2")
    seen: dict[str, int] = {}

    def recorder(path: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            from interp.hooks import primary_tensor

            if path not in seen:
                seen[path] = int(primary_tensor(output).shape[1])
        return hook

    den = pipe.denoiser()
    size = unet.config.sample_size
    x = torch.zeros(1, den.in_channels or 3, size, size, device=den.device, dtype=den.dtype)
    with HookSet() as hooks, torch.no_grad():
        for path, module in paths:
            hooks.forward(module, recorder(path))
        den.predict(x, den.timestep(0.5), pipe.conditioning([[0.5, 0.5]]))
    missing = [p for p, _ in paths if p not in seen]
    if missing:
        raise RuntimeError(f"the attn2 layers {missing} did not run in a forward pass; cannot order them")
    return [Layer(p, short_name(p), int(round(math.sqrt(n)))) for p, n in seen.items()]


# ----------------------------------------------------------------------------------------- interventions
@dataclass(frozen=True)
class Intervention:
    """One row family of the table: a named list of edits (or another model, for a reference).

    Attributes:
        name: stable identifier (table, ``--only``, part files). kind: ``reference`` / ``baseline`` /
        ``layer``. sites: the layers edited, short names joined by ``,`` (``output`` for score composition,
        empty for references). steps: ``all`` or the DDIM step range edited (``0-12``). radius: mask /
        composition radius (normalised units) or ``None``. edits: passed to ``interventions.apply``.
        model: for a reference row of another model, its name (``None``: the swept model).
    """

    name: str
    kind: str
    sites: str = ""
    steps: str = "all"
    radius: float | None = None
    edits: tuple[Any, ...] = ()
    model: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def describe(self) -> dict[str, Any]:
        """JSON-ready description, edits serialised with their ``to_dict()``."""
        return {
            "name": self.name, "kind": self.kind, "sites": self.sites, "steps": self.steps, "radius": self.radius,
            "model": self.model, "edits": [e.to_dict() for e in self.edits],
        }


def trunk_blocks(unet: torch.nn.Module) -> list[str]:
    """``mid_block`` and ``up_blocks.0 …`` of a diffusers-style U-Net, in execution order (``[]`` if it has none)."""
    names = ["mid_block"] if getattr(unet, "mid_block", None) is not None else []
    return names + [f"up_blocks.{i}" for i in range(len(getattr(unet, "up_blocks", ())))]


def high_noise_steps(num_steps: int) -> range:
    """The first half of ``num_steps`` DDIM steps (step 0 is the noisiest), rounded up: 25 → ``range(13)``."""
    return range((num_steps + 1) // 2)


def _groups(layers: Sequence[Layer]) -> dict[str, list[Layer]]:
    finest = max(layer.side for layer in layers)
    groups = {
        "down": [l for l in layers if l.path.startswith("down_blocks.")],
        "mid": [l for l in layers if l.path.startswith("mid_block")],
        "up": [l for l in layers if l.path.startswith("up_blocks.")],
        "lowres": [l for l in layers if l.side < finest],
        "hires": [l for l in layers if l.side == finest],
        "all": list(layers),
    }
    return {g: ls for g, ls in groups.items() if ls}


def plan_interventions(
    layers: Sequence[Layer],
    *,
    num_steps: int,
    radii: Sequence[float] = (0.15,),
    references: Sequence[str] = (),
    edits: Any = None,
    blocks: Sequence[str] = (),
) -> list[Intervention]:
    """The sweep's intervention list (see the module docstring), in table order.

    Args:
        layers: :func:`attn2_layers` of the swept model (execution order).
        num_steps: DDIM steps of the evaluation (sets the high-noise half).
        radii: mask / composition radii; every radius-bearing intervention is repeated per radius.
        references: other models evaluated unpatched (``ref:<name>`` rows).
        edits: the module providing ``MaskCrossAttention``, ``Compose`` and ``ComposeScores`` (default: the
            :mod:`interventions` package).
        blocks: the swept model's trunk blocks from the mid block on, in execution order (:func:`trunk_blocks`);
            empty skips the ``compose-block`` family.
    """
    if edits is None:
        import interventions as edits
    if not layers:
        raise ValueError("the model has no attn2 layers: there is nothing to intervene on")
    early = high_noise_steps(num_steps)
    early_label = f"{early.start}-{early.stop - 1}"
    groups = _groups(layers)
    plan = [Intervention("unpatched", "reference")]
    plan += [Intervention(f"ref:{m}", "reference", model=m) for m in references]

    def sites_of(ls: Sequence[Layer]) -> Any:
        # the glob for all layers keeps the edit's own label readable; otherwise the exact paths
        return ("*attn2",) if len(ls) == len(layers) else tuple(l.path for l in ls)

    def names(ls: Sequence[Layer]) -> str:
        return ",".join(l.name for l in ls)

    for r in radii:
        rt = f"r{r:g}"
        # distance-masked cross-attention: each layer alone, then the groups not equal to a single layer
        mask_sets: list[tuple[str, list[Layer]]] = [(l.name, [l]) for l in layers]
        known = {frozenset(l.path for l in ls) for _, ls in mask_sets}
        for g, ls in groups.items():
            key = frozenset(l.path for l in ls)
            if key not in known:
                known.add(key)
                mask_sets.append((g, ls))
        for suffix, steps, label in (("", None, "all"), (":early", early, early_label)):
            for tag, ls in mask_sets:
                plan.append(Intervention(
                    f"mask:{tag}:{rt}{suffix}", "layer", names(ls), label, float(r),
                    (edits.MaskCrossAttention(sites=sites_of(ls), radius=float(r), steps=steps),),
                ))
        # feature-space composition at each group, then from each layer onward (the first = compose:all)
        compose_sets: list[tuple[str, list[Layer]]] = []
        seen_sets: set[frozenset[str]] = set()
        for g, ls in groups.items():
            key = frozenset(l.path for l in ls)
            if key not in seen_sets:
                seen_sets.add(key)
                compose_sets.append((g, ls))
        for g, ls in compose_sets:
            plan.append(Intervention(
                f"compose:{g}:{rt}", "layer", names(ls), "all", float(r),
                (edits.Compose(sites=sites_of(ls), radius=float(r)),),
            ))
        for i, layer in enumerate(layers[1:], start=1):
            ls = list(layers[i:])
            plan.append(Intervention(
                f"compose-from:{layer.name}:{rt}", "layer", names(ls), "all", float(r),
                (edits.Compose(sites=sites_of(ls), radius=float(r)),),
            ))
        for block in blocks:
            plan.append(Intervention(
                f"compose-block:{block}:{rt}", "layer", block, "all", float(r),
                (edits.Compose(sites=(block,), radius=float(r)),),
            ))
        plan.append(Intervention(f"scores:{rt}", "baseline", "output", "all", float(r), (edits.ComposeScores(radius=float(r)),)))
    dup = [n for n in {i.name for i in plan} if sum(j.name == n for j in plan) > 1]
    if dup:
        raise ValueError(f"duplicate intervention names {sorted(dup)} (are two radii equal?)")
    return plan


def select(plan: Sequence[Intervention], only: str | Sequence[str] | None) -> list[Intervention]:
    """Keep the interventions named in ``only`` (names or ``fnmatch`` globs, comma-separated or a list).

    Raises ``ValueError`` for a pattern that matches nothing, listing close names: a typo never silently
    selects nothing.
    """
    if only is None:
        return list(plan)
    patterns = [p.strip() for p in (only.split(",") if isinstance(only, str) else only) if p.strip()]
    if not patterns:
        raise ValueError("only is empty: give intervention names such as 'unpatched,mask:up:r0.15' or leave it out")
    names = [i.name for i in plan]
    keep: set[str] = set()
    for p in patterns:
        hits = fnmatch.filter(names, p)
        if not hits:
            close = difflib.get_close_matches(p, names, n=5, cutoff=0.4)
            raise ValueError(f"no intervention matches {p!r}; close names: {close or names[:8]} (list them all with --list)")
        keep.update(hits)
    return [i for i in plan if i.name in keep]


# ------------------------------------------------------------------------------------------------ units
def unit_stem(name: str, k: int) -> str:
    """File-name-safe stem of a unit: a readable slug plus a hash of the exact name (slugs may collide)."""
    return f"{slug(name)}__k{k}"


def slug(name: str) -> str:
    """File-name-safe form of an intervention name (readable part + 8 hex digits of its hash)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def tidy_row(inter: Intervention, stats: dict[str, Any]) -> dict[str, Any]:
    """One table row (:data:`COLUMNS`) from an intervention and a ``per_k`` entry of ``evaluate_length``."""
    from interp.clevr.metrics import wilson_interval

    k, n = int(stats["k"]), int(stats["n"])
    row: dict[str, Any] = {
        "intervention": inter.name, "kind": inter.kind, "sites": inter.sites, "steps": inter.steps,
        "radius": inter.radius, "k": k, "n": n,
    }
    trials = {"count_acc": n, "recall": k * n, "placement_acc": n}
    for metric in COLUMNS[7:]:
        if metric.endswith(("_lo", "_hi")):
            continue
        value = float(stats.get(metric, float("nan")))
        row[metric] = value
        if metric in trials:
            # the fractions are exact ratios of integers, so rounding recovers the success count
            ok = math.isfinite(value) and trials[metric] > 0
            lo, hi = wilson_interval(round(value * trials[metric]), trials[metric]) if ok else (float("nan"),) * 2
            row[f"{metric}_lo"], row[f"{metric}_hi"] = lo, hi
    return {c: row[c] for c in COLUMNS}


def _nan_to_none(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def _images_bytes(images: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), allow_pickle=False)
    return buf.getvalue()


def read_parts(out: str | Path) -> "Any":
    """The tidy table of every finished unit under ``out/parts`` (also while a sweep is still running).

    Returns a ``pandas.DataFrame`` with :data:`COLUMNS` (empty when nothing has finished).
    """
    import pandas as pd

    rows = []
    for p in sorted((Path(out) / "parts").glob("*.json")):
        rows.append(json.loads(p.read_text())["row"])
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype({"radius": float})


# ------------------------------------------------------------------------------------------------- run
@dataclass
class SweepResult:
    """What :func:`run_locality_sweep` did: the table, the units run and skipped, the files, the wall time."""

    frame: Any
    ran: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0


def default_references(model: str) -> list[str]:
    """exp1 (generalises) and exp3 (LCS by construction) beside exp2 (fails); none for other models."""
    return ["exp1", "exp3"] if str(model) == "exp2" else []


def check_radii(radii: Iterable[float]) -> list[float]:
    """Finite positive radii, unique, in the given order; ``ValueError`` naming ``radii`` otherwise."""
    out: list[float] = []
    for r in radii:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"radii must be finite numbers > 0 (normalised units, e.g. 0.15), got {r!r}")
        if float(r) not in out:
            out.append(float(r))
    if not out:
        raise ValueError("radii is empty: give at least one radius, e.g. 0.15")
    return out


def _check_settings(path: Path, settings: dict[str, Any]) -> None:
    check_settings(path, settings, FIXED, may_change="counts, radii, references and --only")


def machine() -> dict[str, Any]:
    """Where the sweep ran: platform, CPU count, torch threads and version, GPU name if any."""
    info = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_locality_sweep(
    model: str,
    *,
    counts: Sequence[int] | str,
    out: str | Path,
    n: int = 64,
    seed: int = 0,
    steps: int = 25,
    radii: Sequence[float] = (0.15,),
    only: str | Sequence[str] | None = None,
    references: Sequence[str] | None = None,
    json_path: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    batch_size: int = 64,
    keep_images: int = 4,
    progress: Callable[[str], None] | None = None,
    figures: bool = True,
    plan: Sequence[Intervention] | None = None,
    apply: Callable[..., ContextManager[Any]] | None = None,
) -> SweepResult:
    """Run (or resume) the sweep; see the module docstring for what it computes and writes.

    Args:
        model: a name or folder for :func:`interp.models.registry.load_model` (a CLEVR model).
        counts: requested object counts (``"1-10"``, ``"4,6,8"`` or a list; as in ``scorescope clevr eval``).
        out: the sweep folder. n / seed / steps: scenes per count, seed, DDIM steps (checked like
            ``clevr eval``). radii: mask / composition radii. only: names or globs to run (:func:`select`).
        references: models evaluated unpatched beside it (default :func:`default_references`).
        json_path: also write the table, settings, machine and wall time there (atomically).
        overwrite: claim a non-empty folder that is not this sweep's (nothing in it is deleted).
        device: where the models run (default: CUDA when present). batch_size: scenes per sampling batch.
        keep_images: samples kept per (intervention, k) for the grids.
        progress: called with one line per unit.
        figures: write the heatmap, the from-layer plot and the sample grids (the table and parts always).
        plan: the intervention list (default :func:`plan_interventions` on the model's layers).
        apply: the context manager that installs edits, ``apply(unet, *edits)`` (default
            :func:`interventions.apply`).

    Raises:
        interp.clevr.evaluate.OptionError: a ``ValueError`` whose ``option`` names the CLI option at fault: bad
            ``counts`` / ``n`` / ``seed`` / ``steps`` / ``radii`` / ``only`` / ``references`` / ``model``, an
            unwritable ``json_path``, or an ``out`` holding a sweep with other fixed settings (names them).
        FileExistsError: ``out`` is another command's or a user's folder and ``overwrite`` is off.
    """
    from interp.clevr.detect import DetectorConfig
    from interp.clevr.evaluate import OptionError, check_eval_options, evaluate_length, parse_counts
    from interp.clevr.metrics import MATCH_RADIUS
    from scorescope.experiments.study import load_clevr_model

    t0 = time.perf_counter()
    try:
        ks = parse_counts(counts) if isinstance(counts, str) else parse_counts(list(counts))
    except ValueError as err:
        raise OptionError(str(err), "--counts") from None
    check_eval_options(n=n, seed=seed, steps=steps)
    if batch_size < 1 or keep_images < 1:
        raise ValueError(f"batch_size and keep_images must be >= 1, got {batch_size} and {keep_images}")
    try:
        radii = check_radii(radii)
    except ValueError as err:
        raise OptionError(str(err), "--radii") from None
    if json_path is not None:
        try:
            check_writable_file(json_path, what="--json file")
        except ValueError as err:
            raise OptionError(str(err), "--json") from None
    refs = default_references(model) if references is None else list(references)
    from interp.models.registry import known_names

    unknown = [r for r in refs if r not in known_names() and not Path(r).is_dir()]
    if unknown:
        raise OptionError(f"unknown reference models {unknown}; known: {', '.join(known_names())} or a model folder", "--references")
    from interp.distributed import rank_device

    device = rank_device(device)  # several processes: each on its own GPU (cuda:LOCAL_RANK)
    loaded = load_clevr_model(model, needs="the locality sweep", device=device)
    pipe = loaded.pipeline
    if plan is None:
        plan = plan_interventions(attn2_layers(pipe), num_steps=steps, radii=radii, references=refs,
                                  blocks=trunk_blocks(pipe.unet))
    try:
        chosen = select(plan, only)
    except ValueError as err:
        raise OptionError(str(err), "--only") from None
    if apply is None:
        from interventions import apply
    detector = DetectorConfig()
    settings = {
        "model": str(model), "config_hash": pipe.denoiser().metadata()["config_hash"], "n": n, "seed": seed,
        "steps": steps, "match_radius": MATCH_RADIUS, "detector": dict(detector.__dict__), "guidance_scale": None,
        "sampler": "ddim", "counts": ks, "radii": radii, "references": refs,
    }
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists, so a resume compares equal
    from interp.distributed import distributed

    with distributed() as dist:
        return _run_units(dist, model, pipe, chosen, ks, out, overwrite, settings, device, apply, n, seed, steps,
                          batch_size, keep_images, detector, progress, figures, json_path, t0)


def _run_units(dist: Any, model: str, pipe: Any, chosen: list[Intervention], ks: list[int], out: str | Path,
               overwrite: bool, settings: dict[str, Any], device: str, apply: Callable[..., ContextManager[Any]],
               n: int, seed: int, steps: int, batch_size: int, keep_images: int, detector: Any,
               progress: Callable[[str], None] | None, figures: bool, json_path: str | Path | None, t0: float) -> SweepResult:
    """This rank's pending units of :func:`run_locality_sweep`, then (rank 0) the table, figures and JSON."""
    from interp.clevr.evaluate import OptionError, evaluate_length
    from interp.clevr.metrics import MATCH_RADIUS
    from interp.models.registry import load_model

    def claim() -> Path:
        folder = prepare_output_dir(out, KIND, overwrite=overwrite)
        (folder / "parts").mkdir(exist_ok=True)
        try:
            _check_settings(folder / "sweep.json", settings)
        except ValueError as err:
            raise OptionError(str(err), "--out") from None
        return folder

    out = dist.on_main(claim)
    parts = out / "parts"

    def part_of(unit: tuple[Intervention, int]) -> Path:
        return parts / f"{unit_stem(unit[0].name, unit[1])}.json"

    units = [(inter, k) for inter in chosen for k in ks]
    pending = dist.pending(units, done=lambda u: part_of(u).exists())
    todo = dist.share(pending)
    pipes: dict[str | None, Any] = {None: pipe}
    result = SweepResult(frame=None)
    if progress and dist.is_main:
        for inter, k in units:
            if (inter, k) not in pending:
                progress(f"skip {inter.name} k={k} (done)")
    for inter, k in todo:
        stem = unit_stem(inter.name, k)
        part, npy = parts / f"{stem}.json", parts / f"{stem}.npy"
        if inter.model not in pipes:
            pipes[inter.model] = load_model(inter.model, device=device).pipeline
        p = pipes[inter.model]
        u0 = time.perf_counter()
        ctx = apply(p.unet, *inter.edits) if inter.edits else contextlib.nullcontext()
        with ctx:
            res = evaluate_length(p, [k], n=n, seed=seed, steps=steps, batch_size=batch_size,
                                  radius=MATCH_RADIUS, detector=detector, model_name=inter.model or str(model),
                                  keep_images=keep_images)
        wall = time.perf_counter() - u0
        stats = res["per_k"][0]
        row = tidy_row(inter, stats)
        imgs = res["_images"][0]
        atomic_write(npy, _images_bytes(imgs))  # before the JSON: a finished part always has its samples
        record = {"row": {c: _nan_to_none(v) for c, v in row.items()}, "error_hist": stats["error_hist"],
                  "intervention": inter.describe(), "wall_s": round(wall, 3)}
        atomic_write_json(part, record)
        dist.part_written()
        if progress:
            progress(f"done {inter.name} k={k}: recall={row['recall']:.3f} count_acc={row['count_acc']:.3f} "
                     f"placement_acc={row['placement_acc']:.3f} ({wall:.1f} s)"
                     + (f" (rank {dist.rank})" if dist.world_size > 1 else ""))
    dist.barrier()  # every rank's parts are on disk: read them all back, in table order
    rows: list[dict[str, Any]] = []
    images: dict[str, dict[int, np.ndarray]] = {}
    compute_s = 0.0
    for inter, k in units:
        part = part_of((inter, k))
        npy = part.with_suffix(".npy")
        data = json.loads(part.read_text())
        if data["row"]["intervention"] != inter.name or data["row"]["k"] != k:
            raise ValueError(f"{part} holds {data['row']['intervention']!r} k={data['row']['k']}, not {inter.name!r} k={k}")
        rows.append(data["row"])
        compute_s += float(data.get("wall_s", 0.0))
        if npy.exists():
            images.setdefault(inter.name, {})[k] = np.load(npy, allow_pickle=False)
    # ran: by any rank in this launch; skipped: finished before it (resumed)
    result.ran = [(i.name, k) for i, k in pending]
    result.skipped = [(i.name, k) for i, k in units if (i, k) not in pending]
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(COLUMNS)).astype({"radius": float})
    result.frame = frame
    if not dist.is_main:  # rank 0 writes the table, figures and JSON (every rank returns the table)
        result.wall_s = time.perf_counter() - t0
        return result
    result.paths["csv"] = atomic_write(out / "results.csv", frame.to_csv(index=False))
    if figures and len(frame):
        result.paths["heatmap"] = heatmap(frame, out / "heatmap.png")
        from_layer = from_layer_figure(frame, chosen, out / "from_layer.png")
        if from_layer is not None:
            result.paths["from_layer"] = from_layer
        (out / "samples").mkdir(exist_ok=True)
        from interp.clevr.evaluate import sample_grid

        for inter in chosen:
            per_k = images.get(inter.name, {})
            if per_k:
                stack = torch.from_numpy(np.stack([per_k[k] for k in sorted(per_k)])).float() / 255
                sample_grid({"_images": stack}, out / "samples" / f"{slug(inter.name)}.png")
    result.wall_s = time.perf_counter() - t0
    if json_path is not None:
        summary = {
            "settings": settings,
            "interventions": [i.describe() for i in chosen],
            "rows": [{c: _nan_to_none(v) for c, v in r.items()} for r in frame.to_dict("records")],
            "machine": dict(machine(), device=device),
            "wall_s": round(result.wall_s, 1),
            "compute_s": round(compute_s, 1),
            "units": {"ran": len(result.ran), "skipped": len(result.skipped)},
            "out": str(out),
        }
        result.paths["json"] = atomic_write_json(json_path, summary)
    return result


# ---------------------------------------------------------------------------------------------- figures
def heatmap(frame: Any, path: str | Path) -> Path:
    """Two seaborn heatmaps side by side, intervention × k: recall and count accuracy (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from interp.clevr.evaluate import save_figure

    order = list(dict.fromkeys(frame["intervention"]))
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.5 * frame["k"].nunique() * 2, 1.5 + 0.28 * len(order)), sharey=True)
    for ax, metric in zip(axes, ("recall", "count_acc")):
        grid = frame.pivot_table(index="intervention", columns="k", values=metric, aggfunc="first").reindex(order)
        sns.heatmap(grid.astype(float), vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f", annot_kws={"size": 7},
                    cbar=ax is axes[-1], ax=ax)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("requested objects k")
        ax.set_ylabel("" if ax is not axes[0] else "intervention")
    return save_figure(fig, path)


def from_layer_figure(frame: Any, plan: Sequence[Intervention], path: str | Path) -> Path | None:
    """Recall against the first composed layer L (``compose:all`` = the first layer), one line per k and radius.

    Returns ``None`` (and writes nothing) when the frame holds no ``compose-from`` rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from interp.clevr.evaluate import save_figure

    by_name = {i.name: i for i in plan}
    picked = []
    for r in frame.to_dict("records"):
        inter = by_name.get(r["intervention"])
        if inter is None:
            continue
        if r["intervention"].startswith("compose-from:") or r["intervention"].startswith("compose:all:"):
            first = inter.sites.split(",")[0]
            picked.append(dict(r, from_layer=first))
    if not any(p["intervention"].startswith("compose-from:") for p in picked):
        return None
    df = pd.DataFrame(picked)
    order = list(dict.fromkeys(df.sort_values("sites", key=lambda s: -s.str.count(",")).from_layer))
    df["L"] = df["from_layer"].map({name: i for i, name in enumerate(order)})
    df["series"] = "k=" + df["k"].astype(str) + " r=" + df["radius"].map("{:g}".format)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    sns.lineplot(data=df, x="L", y="recall", hue="series", marker="o", ax=ax)
    ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("Compose from layer L onward (execution order)")
    ax.set_title("where must locality be enforced?")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


__all__ = [
    "COLUMNS", "FIXED", "KIND", "Intervention", "Layer", "SweepResult", "attn2_layers", "check_radii",
    "default_references", "from_layer_figure", "heatmap", "high_noise_steps", "machine", "plan_interventions",
    "read_parts", "run_locality_sweep", "select", "short_name", "slug", "tidy_row", "unit_stem",
]
