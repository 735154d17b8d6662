"""Length generalisation, measured *(ours)*: ask for k = 0…10 objects and count what comes out.

For each requested count ``k``: draw ``n`` sets of ``k`` valid random locations (the renderer's placement
rule: border margin and minimum separation; seeded by ``(seed, k)``), sample one image per set with the
model (DDIM, seeded), detect objects (:mod:`interp.clevr.detect`) and score them
(:mod:`interp.clevr.metrics`): count accuracy P(detected = k), recall and precision of locations (Hungarian
matching within a radius), placement accuracy (every requested location filled), mean detected count, unrequested objects per image and the count-error histogram.

The same sets of locations are used for every model evaluated with the same seed, so tables of different
models are paired comparisons. Colour-conditioned models get a random colour per location (also seeded), and
are also scored on whether each matched object has the requested colour (``colour_acc``).
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from interp.clevr.detect import DetectorConfig, detect
from interp.clevr.attributes import read_colours
from interp.clevr.metrics import MATCH_RADIUS, colour_accuracy, count_stats
from interp.clevr.render import COLOUR_NAMES, MAX_OBJECTS, sample_positions
from interp.io import atomic_write, atomic_write_json, check_writable_file

#: The training range of the Exp1–3 recipes (shaded in the figure).
TRAIN_RANGE: tuple[int, int] = (1, 3)

#: Per-k metrics that are fractions in [0, 1] (the others are counts).
FRACTIONS: tuple[str, ...] = ("count_acc", "recall", "precision", "placement_acc", "colour_acc")


def parse_counts(spec: str | Sequence[int]) -> list[int]:
    """``"0-10"``, ``"1,2,6"`` or a list → sorted unique counts, each checked against :data:`MAX_OBJECTS`.

    Raises ``ValueError`` for anything that is not a list of integers or ascending ranges (a reversed range
    such as ``"5-3"`` is refused rather than read as no counts).
    """
    if isinstance(spec, str):
        out: list[int] = []
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            a, dash, b = part.partition("-")
            try:
                lo, hi = int(a), int(b if dash else a)  # "1-" (a range missing its end) does not parse
            except ValueError:
                raise ValueError(f"cannot parse counts {spec!r}: use a range like '0-10' or a list like '1,2,6'") from None
            if min(lo, hi) < 0:
                raise ValueError(f"requested counts in {part!r} are outside 0…{MAX_OBJECTS} (the renderer's maximum number of objects)")
            if hi < lo:
                raise ValueError(f"the range {part!r} in counts {spec!r} is reversed; write it as '{hi}-{lo}'")
            out.extend(range(lo, hi + 1))
    else:
        out = []
        for k in spec:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise ValueError(f"counts must be integers, got {k!r} in {list(spec)!r}")
            out.append(int(k))
    if not out:
        raise ValueError(f"no counts in {spec!r}")
    bad = [k for k in out if not 0 <= k <= MAX_OBJECTS]
    if bad:
        raise ValueError(f"requested counts {bad} are outside 0…{MAX_OBJECTS} (the renderer's maximum number of objects)")
    return sorted(set(out))


def request_sets(k: int, n: int, seed: int) -> list[np.ndarray]:
    """``n`` random valid location sets ``(k, 2)`` for count ``k``; depends only on ``(seed, k)``."""
    rng = np.random.default_rng([seed, k, 7])
    return [sample_positions(rng, k) for _ in range(n)]


def _is_colour(pipe: Any) -> bool:
    return "colour" in type(pipe.location_encoder).__name__.lower()


def generate(pipe: Any, locations: Sequence[np.ndarray], *, seed: int, steps: int, batch_size: int = 64, colours: Sequence[np.ndarray] | None = None, guidance_scale: float | None = None) -> Tensor:
    """Sample one image per location set; returns ``(N, 3, H, W)`` in [0, 1] (CPU, float32).

    Batch ``b`` (rows ``b · batch_size …``) draws its noise from ``seed · 100003 + b · batch_size`` alone
    (:func:`generate_batch`), so a batch can be sampled on its own — on another process — with the same numbers.
    """
    out = []
    for start in range(0, len(locations), batch_size):
        cols = None if colours is None else colours[start : start + batch_size]
        out.append(generate_batch(pipe, locations[start : start + batch_size], seed=seed, start=start, steps=steps,
                                  colours=cols, guidance_scale=guidance_scale))
    return torch.cat(out)


def generate_batch(pipe: Any, locations: Sequence[np.ndarray], *, seed: int, start: int, steps: int, colours: Sequence[np.ndarray] | None = None, guidance_scale: float | None = None) -> Tensor:
    """The batch of :func:`generate` whose first row is row ``start``: ``(len(locations), 3, H, W)`` in [0, 1]."""
    from interp.sampling import sample

    den = pipe.denoiser(guidance_scale=guidance_scale)
    size = pipe.unet.config.sample_size
    if colours is not None:
        conds = [pipe.conditioning(loc, colours=col) for loc, col in zip(locations, colours)]
    else:
        conds = [pipe.conditioning(loc) for loc in locations]
    x = sample(den, conds, shape=(len(conds), 3, size, size), num_steps=steps, seed=seed * 100_003 + start, scheduler="ddim")
    return ((x.clamp(-1, 1) + 1) / 2).float().cpu()


class OptionError(ValueError):
    """A bad evaluation setting; ``option`` is the ``scorescope clevr eval`` option that sets it."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


def check_eval_options(*, n: int, seed: int, steps: int, guidance_scale: float | None = None) -> None:
    """Refuse evaluation settings that would fail late or measure nothing.

    Raises :class:`OptionError` (a ``ValueError``) naming the argument and its CLI option.
    """
    if n < 1:
        raise OptionError(f"n must be >= 1 scene per count (--n), got {n}", "--n")
    if seed < 0:
        raise OptionError(f"seed must be >= 0 (--seed; it seeds numpy's generator), got {seed}", "--seed")
    if steps < 1:
        raise OptionError(f"steps must be >= 1 sampling step (--steps), got {steps}", "--steps")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise OptionError(f"guidance_scale must be a finite number (--guidance), got {guidance_scale}", "--guidance")


def evaluate_length(
    pipe: Any,
    counts: Sequence[int] | str = range(MAX_OBJECTS + 1),
    *,
    n: int = 64,
    seed: int = 0,
    steps: int = 25,
    batch_size: int = 64,
    radius: float = MATCH_RADIUS,
    guidance_scale: float | None = None,
    detector: DetectorConfig = DetectorConfig(),
    model_name: str = "model",
    keep_images: int = 4,
    parts: str | Path | None = None,
    dist: Any = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Run the length-generalisation evaluation.

    The work is a list of units ``(k, sample batch)``: batch ``b`` of count ``k`` holds scenes
    ``b · batch_size …`` and draws its noise from ``(seed, k, b)`` alone, so the numbers depend on ``batch_size``
    (not on the order or the process a unit runs on). ``parts``: a folder for one part file per finished unit
    (claimed as ``clevr-eval-parts``; its ``eval.json`` holds the settings, and a resume with other settings is
    refused naming them) — the evaluation then resumes after an interruption. ``dist``: an
    :class:`interp.distributed.Distributed` to split the units across processes (``parts`` required; every rank
    returns the whole result). ``progress``: called with one line per unit run (parts only).

    Returns a JSON-ready dict: ``per_k`` (list of ``{"k", "n", "count_acc", "recall", "precision",
    "placement_acc", "mean_count", "mean_extra", "error_hist"}``, plus ``"colour_acc"`` for colour-conditioned models: the
    fraction of matched objects drawn in the requested colour, read by
    :func:`~interp.clevr.attributes.read_colours`), ``meta`` (model, seed, steps, radius, ...), and under
    ``"_images"`` a ``(len(counts), keep_images, 3, H, W)`` tensor of the first samples per k for the grid figure (dropped by
    :func:`write_outputs` when writing the JSON).
    """
    ks = parse_counts(counts) if isinstance(counts, str) else parse_counts(list(counts))
    check_eval_options(n=n, seed=seed, steps=steps, guidance_scale=guidance_scale)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if keep_images < 1:
        raise ValueError(f"keep_images must be >= 1 (the sample grid needs a column), got {keep_images}")
    t0 = time.time()
    colour = _is_colour(pipe)
    requests = {k: request_sets(k, n, seed) for k in ks}
    palette = {k: _request_colours(k, n, seed) if colour else None for k in ks}
    units = [(k, start) for k in ks for start in range(0, n, batch_size)]

    def run(unit: tuple[int, int]) -> dict[str, Any]:
        k, start = unit
        cols = palette[k]
        return _batch_unit(pipe, requests[k][start : start + batch_size], None if cols is None else cols[start : start + batch_size],
                           seed=seed * 1000 + k, start=start, steps=steps, guidance_scale=guidance_scale,
                           detector=detector, keep=max(0, keep_images - start))

    if parts is None:
        if dist is not None and dist.world_size > 1:
            raise ValueError(f"parts is required on {dist.world_size} processes: the ranks exchange their units as part files")
        done = {unit: run(unit) for unit in units}
    else:
        done = _run_parts(units, run, Path(parts), dist, progress, settings={
            "model": model_name, "config_hash": _weights_hash(pipe), "n": n, "seed": seed, "steps": steps,
            "batch_size": batch_size, "keep_images": keep_images, "guidance_scale": guidance_scale,
            "detector": dict(detector.__dict__), "colour": colour,
        })
    per_k, grids = [], []
    for k in ks:
        batches = [done[(k, start)] for start in range(0, n, batch_size)]
        positions = [p for b in batches for p in b["positions"]]
        row = count_stats(k, requests[k], positions, radius).as_dict()
        if colour:
            read = [c for b in batches for c in b["colours"]]
            row["colour_acc"] = colour_accuracy(requests[k], palette[k], positions, read, radius)
        per_k.append(row)
        grids.append(torch.cat([b["images"] for b in batches])[:keep_images])
    meta = {
        "model": model_name,
        "seed": seed,
        "n": n,
        "counts": ks,
        "sampler": "ddim",
        "steps": steps,
        "guidance_scale": guidance_scale,
        "match_radius": radius,
        "detector": detector.__dict__,
        "train_range": list(TRAIN_RANGE),
        "wall_s": round(time.time() - t0, 1),
    }
    return {"per_k": per_k, "meta": meta, "_images": torch.stack(grids) if grids else None}


def _request_colours(k: int, n: int, seed: int) -> list[np.ndarray]:
    """The requested palette indices ``(k,)`` of the ``n`` scenes of count ``k``; depends only on ``(seed, k)``."""
    rng = np.random.default_rng([seed, k, 11])
    return [rng.integers(0, len(COLOUR_NAMES), size=k) for _ in range(n)]


def _batch_unit(pipe: Any, locations: Sequence[np.ndarray], colours: Sequence[np.ndarray] | None, *, seed: int, start: int, steps: int, guidance_scale: float | None, detector: DetectorConfig, keep: int) -> dict[str, Any]:
    """Sample, detect (and read colours of) one batch: ``positions`` / ``colours`` per image, the first ``keep`` images."""
    imgs = generate_batch(pipe, locations, seed=seed, start=start, steps=steps, colours=colours, guidance_scale=guidance_scale)
    det = detect(imgs, detector)
    read = read_colours(imgs, det.positions) if colours is not None else None
    return {"positions": det.positions, "colours": read, "images": imgs[:keep]}


def _weights_hash(pipe: Any) -> str:
    """A short hash of the U-Net and encoder weights: a parts folder belongs to one model."""
    import hashlib

    h = hashlib.sha1()
    for module in (pipe.unet, pipe.location_encoder):
        for name, v in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


#: Marker kind of an evaluation's parts folder.
PARTS_KIND = "clevr-eval-parts"

#: Settings a parts folder is bound to (the counts may change: new counts add units).
PARTS_FIXED = ("model", "config_hash", "n", "seed", "steps", "batch_size", "keep_images", "guidance_scale", "detector", "colour")


def _pack(unit: dict[str, Any]) -> bytes:
    """A unit as safetensors bytes (ragged per-image arrays as one concatenation plus per-image lengths)."""
    from safetensors.torch import save

    pos = unit["positions"]
    tensors = {
        "lengths": torch.tensor([len(p) for p in pos], dtype=torch.int64),
        "positions": torch.from_numpy(np.concatenate(pos).astype(np.float32).reshape(-1, 2)),
        "images": unit["images"].contiguous(),
    }
    if unit["colours"] is not None:
        tensors["colours"] = torch.from_numpy(np.concatenate(unit["colours"]).astype(np.int64))
    return save(tensors)


def _unpack(blob: bytes) -> dict[str, Any]:
    from safetensors.torch import load

    t = load(blob)
    cuts = np.cumsum(t["lengths"].numpy())[:-1]
    positions = np.split(t["positions"].numpy(), cuts)
    colours = np.split(t["colours"].numpy(), cuts) if "colours" in t else None
    return {"positions": positions, "colours": colours, "images": t["images"]}


def _run_parts(units: list[tuple[int, int]], run: Any, folder: Path, dist: Any, progress: Any, *, settings: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    """Run the units missing from ``folder`` (this rank's share of them) and read every unit back from its part."""
    from interp.distributed import single_process
    from interp.io import check_settings, prepare_output_dir

    settings = json.loads(json.dumps(settings))  # as stored, so a resume compares equal

    def part_of(unit: tuple[int, int]) -> Path:
        return folder / f"k{unit[0]:02d}_b{unit[1]:06d}.safetensors"

    def claim() -> None:
        prepare_output_dir(folder, PARTS_KIND)
        try:
            check_settings(folder / "eval.json", settings, PARTS_FIXED, may_change="the counts")
        except ValueError as err:
            raise OptionError(str(err).replace("--out", "--parts"), "--parts") from None

    # No dist: one process, even under torchrun (this function also runs inside other distributed sweeps).
    d = dist if dist is not None else single_process()
    d.on_main(claim)
    for unit in d.my_units(units, done=lambda u: part_of(u).exists()):
        atomic_write(part_of(unit), _pack(run(unit)))
        d.part_written()
        if progress:
            progress(f"done k={unit[0]} scenes {unit[1]}…" + (f" (rank {d.rank})" if d.world_size > 1 else ""))
    d.barrier()
    return {unit: _unpack(part_of(unit).read_bytes()) for unit in units}


def figure(result: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Seaborn line plot of count accuracy, recall and precision against k, training range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame(result["per_k"])
    metrics = [m for m in FRACTIONS if m in df]
    long = df.melt(id_vars="k", value_vars=metrics, var_name="metric", value_name="value")
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    lo, hi = result["meta"].get("train_range", TRAIN_RANGE)
    ax.axvspan(lo - 0.5, hi + 0.5, color="0.85", zorder=0, label="training range")
    sns.lineplot(data=long, x="k", y="value", hue="metric", marker="o", ax=ax)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("requested objects k")
    ax.set_ylabel("")
    ax.set_xticks(df["k"].tolist())
    ax.set_title(title or f"length generalisation: {result['meta']['model']} (n={result['meta']['n']} per k)")
    ax.legend(fontsize=8, loc="lower left")
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (:func:`interp.io.atomic_write`) and close it.

    The format follows the suffix (``.png``, ``.pdf``, ``.svg``, ...; PNG when there is none).
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def sample_grid(result: dict[str, Any], path: str | Path, scale: int = 3) -> Path:
    """PNG grid of the kept samples: one row per k (top: smallest k), ``keep_images`` columns."""
    from PIL import Image

    imgs = result["_images"]  # (K, m, 3, H, W)
    if imgs is None:
        raise ValueError("the result holds no images")
    K, m, _, H, W = imgs.shape
    pad = 2
    canvas = np.ones((K * (H + pad) + pad, m * (W + pad) + pad, 3), dtype=np.float32)
    for i in range(K):
        for j in range(m):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            canvas[y : y + H, x : x + W] = imgs[i, j].permute(1, 2, 0).numpy()
    img = Image.fromarray((canvas * 255).round().clip(0, 255).astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write(Path(path), buf.getvalue())


def output_paths(json_path: str | Path, *, figure_path: str | Path | None = None, grid_path: str | Path | None = None) -> dict[str, Path]:
    """Resolve and check the evaluation's output files *before* any sampling.

    Defaults: the figure and grid go next to the JSON (``NAME_accuracy.png``, ``NAME_samples.png``). Each path
    must be writable (:func:`interp.io.check_writable_file`; missing folders are created) and the three must
    differ, or one output would silently replace another.

    Raises:
        OptionError: a ``ValueError`` naming the option (``--json``, ``--figure``, ``--grid``) and the fix.
    """
    json_path = Path(json_path)
    stem = json_path.with_suffix("")
    paths = {
        "json": json_path,
        "figure": Path(figure_path) if figure_path else stem.with_name(stem.name + "_accuracy.png"),
        "grid": Path(grid_path) if grid_path else stem.with_name(stem.name + "_samples.png"),
    }
    for key, path in paths.items():
        try:
            check_writable_file(path, what=f"--{key} file")
        except ValueError as err:
            raise OptionError(str(err), f"--{key}") from None
    seen: dict[Path, str] = {}
    for key, path in paths.items():
        other = seen.setdefault(path.resolve(), key)
        if other != key:
            raise OptionError(f"{path} is both the --{other} and the --{key} file; give each output its own path", f"--{key}")
    return paths


def write_outputs(result: dict[str, Any], json_path: str | Path, *, figure_path: str | Path | None = None, grid_path: str | Path | None = None) -> dict[str, Path]:
    """Write the JSON, the figure and the sample grid, each atomically (paths: :func:`output_paths`)."""
    paths = output_paths(json_path, figure_path=figure_path, grid_path=grid_path)
    data = {k: v for k, v in result.items() if not k.startswith("_")}
    atomic_write_json(paths["json"], data)
    figure(result, paths["figure"])
    sample_grid(result, paths["grid"])
    return paths


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of the per-k metrics (``placement_acc`` shows ``n/a`` in results written before it existed)."""
    colour = any("colour_acc" in r for r in result["per_k"])
    head = "| k | n | count_acc | recall | precision | placement_acc | mean_count | mean_extra |" + (" colour_acc |" if colour else "")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    nan = float("nan")
    for r in result["per_k"]:
        f = lambda v: "n/a" if v != v else f"{v:.3f}"  # noqa: E731 - NaN-aware formatting
        row = (
            f"| {r['k']} | {r['n']} | {f(r['count_acc'])} | {f(r['recall'])} | {f(r['precision'])} | "
            f"{f(r.get('placement_acc', nan))} | {r['mean_count']:.2f} | {r.get('mean_extra', nan):.2f} |"
        )
        lines.append(row + (f" {f(r.get('colour_acc', nan))} |" if colour else ""))
    return "\n".join(lines)


def compare_figure(results: dict[str, dict[str, Any]], path: str | Path, metric: str = "count_acc") -> Path:
    """One seaborn plot of ``metric`` against k for several models (``{name: result}``), training range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows = [dict(r, model=name) for name, res in results.items() for r in res["per_k"]]
    df = pd.DataFrame(rows)
    if metric not in df:
        raise ValueError(f"metric {metric!r} is not in the results; they hold {sorted(set(df.columns) - {'model', 'error_hist'})}")
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    lo, hi = TRAIN_RANGE
    ax.axvspan(lo - 0.5, hi + 0.5, color="0.85", zorder=0, label="training range")
    sns.lineplot(data=df, x="k", y=metric, hue="model", marker="o", ax=ax)
    if metric in FRACTIONS:
        ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("requested objects k")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_xticks(sorted(df["k"].unique().tolist()))
    ax.legend(fontsize=8)
    return save_figure(fig, path)
