"""``scorescope demo``: the CLEVR study of the paper on the shipped checkpoints, end to end, with a report.

What it does, in order (every step seeded; outputs under ``out/``; :data:`FULL` sizes, :data:`QUICK` for ``--quick``):

1. **Capture.** Samples a two-object scene with ``model`` (default: the shipped ``exp1`` checkpoint) while
   streaming every cross-attention (``*attn2``) output of every step to safetensors shards (``activations/``),
   tabulated in ``capture.csv``; ``sample.png`` is the sample. The tiny SDXL pipeline is captured with
   classifier-free guidance, labelled per step and branch (``sdxl_capture.csv``).
2. **Locality maps of ``model``** on a seeded three-object scene (the forward process of its rendering,
   :func:`scorescope.experiments.feature_profile.clevr_scene`) at several noise levels: pixel locality
   (``pixel_locality.csv``), conditional locality (``conditional_locality.csv``; ∂D/∂c_j by the cost-model mode) and the CPC
   residual (``cpc_residual.csv``); their maps are exported to ``maps/`` (:func:`scorescope.export.export_maps`:
   PDF / SVG / PNG with colorbars, raw arrays, sidecars).
3. **Locality by model**: the in-region fraction and CPC residual of exp1, exp2 and exp3 on the same scene
   (``locality_by_model.csv``).
4. **Length generalisation** of exp1, exp2 and exp3 (:func:`interp.clevr.evaluate.evaluate_length`, reduced
   ``n``; ``length.csv``, one row per model, k and metric with Wilson intervals).
5. **Layer-wise profile** of feature-space conditional locality at every ``attn2`` layer of exp1 and exp2
   (:func:`scorescope.experiments.feature_profile.run_profile`; ``profile.csv``).
6. **Intervention**: a reduced locality sweep on exp2 (:func:`scorescope.experiments.locality_sweep.run_locality_sweep`
   with a small ``only=`` set) beside the unpatched models of step 4 at the same counts (``intervention.csv``).
7. Every figure of steps 3–6 in ``figures/`` (PNG, PDF, SVG), ``report.md`` (figures linked) and a
   self-contained ``report.html`` (figures embedded) stating the numbers and what each means, and
   ``summary.json``.

The sub-experiments keep their resumable folders under ``work/<plan>-seed<seed>/``: a rerun of an interrupted demo with the
same settings skips their finished units. The folder rules are those of every command
(:func:`interp.io.prepare_output_dir`): ``out`` must be missing, empty, or an earlier demo's; anything else is
refused unless ``overwrite``, and nothing in it is ever deleted; every file is written atomically.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from interp.clevr.evaluate import OptionError
from interp.io import atomic_write, atomic_write_json, prepare_output_dir

KIND = "demo"
#: The shipped checkpoints the study compares (Exp1 generalises, Exp2 fails, Exp3 is local by construction).
STUDY_MODELS = ("exp1", "exp2", "exp3")
#: The training range of the three recipes (1–3 objects), shaded in the length figures.
TRAIN_RANGE = (1, 3)
#: The capture scene: two objects, normalised (x, y).
CAPTURE_LOCATIONS = [[0.28, 0.30], [0.72, 0.66]]
#: Radius of the in-region disc and of the CPC masks (normalised units).
RADIUS = 0.2


@dataclass(frozen=True)
class DemoPlan:
    """How much of the study runs; every number in the report comes from these settings."""

    name: str
    capture_steps: int  # DDIM steps of the captured sample
    levels: tuple[float, ...]  # noise fractions of the locality maps
    probe_seeds: tuple[int, ...]  # seed offsets of the locality maps' noise and of the layer profile's scenes
    directions: int  # random JVP directions per conditioner (ours: a cost choice; the maps' support is exact)
    counts: tuple[int, ...]  # requested object counts of the length table
    n: int  # scenes per count (length table and intervention)
    steps: int  # DDIM steps of the length table and intervention
    profile_models: tuple[str, ...]
    profile_sites: str
    profile_levels: tuple[float, ...]
    sweep_counts: tuple[int, ...]
    sweep_only: tuple[str, ...]  # interventions of the reduced sweep (names of plan_interventions)
    pixels: int = 3  # output pixels of the pixel-locality maps: the centre, an object's centre, a corner
    profile_directions: int = 8  # random JVP directions per conditioner of the layer profile
    formats: tuple[str, ...] = ("png", "pdf", "svg")  # formats of every exported figure


#: The default demo: 2.5 minutes on 2 shared CPU cores (measured 2026-12-06; longer while other jobs load them).
FULL = DemoPlan(
    name="full", capture_steps=20, levels=(0.1, 0.5, 0.9), probe_seeds=(0, 1), directions=8,
    counts=(1, 3, 6, 8), n=16, steps=25,
    profile_models=("exp1", "exp2"), profile_sites="*attn2", profile_levels=(0.1, 0.5, 0.9),
    sweep_counts=(6,), sweep_only=("mask:up0.1:r0.15", "compose-block:up_blocks.2:r0.15"),
)
#: ``--quick``: every step at toy size (6–50 s here, by the machine's load; the numbers are noise), for tests and a first look.
QUICK = DemoPlan(
    name="quick", capture_steps=5, levels=(0.9,), probe_seeds=(0,), directions=2,
    counts=(1, 4), n=1, steps=2,
    profile_models=("exp1", "exp2"), profile_sites="up_blocks.0.attentions.1*attn2", profile_levels=(0.9,),
    sweep_counts=(4,), sweep_only=("mask:up0.1:r0.15", "compose-block:up_blocks.2:r0.15"),
    pixels=1, profile_directions=2, formats=("png",),
)


def default_model() -> str:
    """The model the demo captures and maps without ``--model``: the shipped ``exp1`` checkpoint (the study needs the
    shipped checkpoints anyway, so there is no fallback to a random model)."""
    return STUDY_MODELS[0]


def _work_name(plan: DemoPlan, seed: int) -> str:
    """The sub-experiments' folder under ``work/``: one per plan and seed, so that each resumes only its own units
    (a sub-experiment refuses a folder made with other fixed settings)."""
    return f"{plan.name}-seed{seed}"


def _listing(out: Path) -> list[str]:
    """The folder's files relative to it, ``summary.json`` included; the streamed store and the sub-experiments'
    work folders as one entry each (``activations/``, ``work/``), hidden files left out."""
    files = {"summary.json"}
    for p in out.rglob("*"):
        rel = p.relative_to(out).parts
        if not p.is_file() or any(part.startswith(".") for part in rel):
            continue
        files.add(f"{rel[0]}/" if rel[0] in ("activations", "work") else "/".join(rel))
    return sorted(files)


def _write_csv(df: Any, path: Path) -> Path:
    return atomic_write(path, df.to_csv(index=False))


@contextlib.contextmanager
def _bar(total: int, desc: str, enabled: bool | None) -> Iterator[Callable[[str], None]]:
    """A tqdm bar over ``total`` units (ETA included; ``enabled=None``: only on a terminal) and the ``progress``
    callback the sub-experiments call once per finished unit."""
    from tqdm.auto import tqdm

    # mininterval=0: a unit takes seconds, so every update is drawn (tqdm's default would skip fast ones)
    bar = tqdm(total=total, desc=desc, unit="unit", leave=False, disable=None if enabled is None else not enabled,
               file=sys.stderr, mininterval=0)
    try:
        yield lambda line: bar.update(1) if line.startswith("done") else None
    finally:
        bar.close()


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' own loading bars off while the demo runs (it draws its own), restored afterwards."""
    from diffusers.utils import logging as dlog

    was_on = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            dlog.enable_progress_bar()


def run_demo(out: str | Path, *, model: str = "default", seed: int = 0, overwrite: bool = False, quick: bool = False,
             progress: bool | None = None) -> list[str]:
    """Run the demo (see the module docstring) and return the report's headline lines (the files are the output).

    Args:
        out: the output folder (missing, empty or an earlier demo's; anything else needs ``overwrite``).
        model: the model captured and mapped in steps 1–2 (``"default"``: :func:`default_model`); the study of
            steps 3–6 always compares the shipped exp1, exp2 and exp3.
        seed: seeds every random choice (scenes, noise, requested locations).
        overwrite: write into a non-empty folder that is not an earlier demo's (nothing in it is deleted).
        quick: the :data:`QUICK` plan instead of :data:`FULL`.
        progress: tqdm bars on stderr (``None``: only when stderr is a terminal).

    Raises:
        FileExistsError: ``out`` is a user's or another command's folder and ``overwrite`` is off.
        OptionError: (a ``ValueError`` naming the CLI option) ``model`` is unknown or not a CLEVR model, the shipped
            checkpoints are missing, or ``seed`` is negative.
    """
    import matplotlib

    matplotlib.use("Agg")
    from interp.models.shipped import available
    from scorescope.experiments.study import load_clevr_model

    plan = QUICK if quick else FULL
    name = default_model() if model == "default" else model
    missing = [m for m in STUDY_MODELS if m not in available()]
    if missing:
        raise OptionError(f"the demo's study needs the shipped checkpoints {', '.join(missing)} "
                          "(interp/assets/clevr/); reinstall scorescope from its repository", "--model")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise OptionError(f"seed must be an integer >= 0, got {seed!r}", "--seed")
    with _quiet_diffusers():
        # the model is checked before the folder is claimed: a bad name leaves no folder behind
        loaded = load_clevr_model(name, needs="the demo", seed=seed)
        out = prepare_output_dir(out, KIND, overwrite=overwrite)
        (out / "figures").mkdir(exist_ok=True)
        started = time.perf_counter()
        torch.manual_seed(seed)
        from tqdm.auto import tqdm

        findings: dict[str, Any] = {"model": name, "plan": asdict(plan)}
        timings: dict[str, float] = {}
        with tqdm(total=7, desc="scorescope demo", unit="stage", disable=None if progress is None else not progress,
                  file=sys.stderr) as bar:
            @contextlib.contextmanager
            def stage(label: str) -> Iterator[None]:
                """One stage of the demo: named on the bar, timed for summary.json."""
                bar.set_postfix_str(label)
                t0 = time.perf_counter()
                yield
                timings[label] = round(time.perf_counter() - t0, 2)
                bar.update(1)

            with stage("capture"):
                _capture(out, loaded, name, seed, plan, findings)
                _sdxl_capture(out, seed, findings)
            with stage("locality maps"):
                probe_results = _locality_maps(out, loaded, name, seed, plan, overwrite, findings)
            with stage("locality by model"):
                _locality_by_model(out, name, probe_results, seed, plan, progress, findings)
            with stage("length generalisation"):
                length = _length(out, seed, plan, overwrite, progress, findings)
            with stage("layer profile"):
                _profile(out, seed, plan, overwrite, progress, findings)
            with stage("intervention"):
                _intervention(out, seed, plan, length, overwrite, progress, findings)
            with stage("report"):
                from scorescope.demo_report import build_report

                report = build_report(out, findings)
                paths = report.write(out)
    wall = round(time.perf_counter() - started, 2)
    summary = {
        "model": name, "seed": seed, "plan": plan.name, "locations": CAPTURE_LOCATIONS,
        "headline": findings.get("headline", {}),
        "files": _listing(out),
        "wall_seconds": wall,
        "stage_seconds": timings,
        **loaded.denoiser.metadata(),
    }
    atomic_write_json(out / "summary.json", summary)
    lines = list(findings.get("lines", []))
    lines.append(f"wrote {paths[0].name} and {paths[1].name} with {len(report.figures())} figures to {out} in {wall} s")
    return lines


# --------------------------------------------------------------------------------------------- 1. capture
def _capture(out: Path, loaded: Any, name: str, seed: int, plan: DemoPlan, findings: dict[str, Any]) -> None:
    """Sample the two-object scene while streaming every ``*attn2`` output to ``out/activations``."""
    from interp.capture import capture, plan_capture
    from interp.sampling import sample
    from interp.store import ShardedStore

    den, pipe = loaded.denoiser, loaded.pipeline
    cond = pipe.conditioning(CAPTURE_LOCATIONS)
    size = pipe.unet.config.sample_size
    budget = plan_capture(den, "*attn2", sample_shape=(1, 3, size, size), tokens_shape=(1, cond.tokens.shape[0], cond.dim),
                          calls=plan.capture_steps)
    store_dir = out / "activations"
    # overwrite=True replaces only an earlier store's own shard files; anything else in the folder stays.
    store = ShardedStore(store_dir, metadata={**den.metadata(), "seed": seed, "locations": CAPTURE_LOCATIONS}, overwrite=True)
    try:
        with torch.no_grad(), capture(den, "*attn2", store=store, plan=budget) as cap:
            image = sample(den, cond, shape=(1, 3, size, size), num_steps=plan.capture_steps, seed=seed)
    finally:
        store.close()
    _write_csv(cap.frame(), out / "capture.csv")
    from PIL import Image
    import io

    img = ((image[0].clamp(-1, 1) + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(img).resize((4 * size, 4 * size), Image.NEAREST).save(buf, format="PNG")
    atomic_write(out / "sample.png", buf.getvalue())
    findings["capture"] = {"tensors": len(cap.store), "budget": str(budget), "steps": plan.capture_steps}
    findings.setdefault("lines", []).append(f"model: {name}; captured {len(cap.store)} tensors ({budget}) into {store_dir}")


def _sdxl_capture(out: Path, seed: int, findings: dict[str, Any]) -> None:
    """The tiny SDXL pipeline under classifier-free guidance: every call labelled with its step and branch."""
    from interp.capture import capture
    from interp.models import prompt_conditioning, sdxl_denoiser, tiny_sdxl
    from interp.sampling import sample

    sd = tiny_sdxl(seed)
    sd_cond = prompt_conditioning(sd, ["a red cube", "a blue sphere"])
    sd_den = sdxl_denoiser(sd, guidance_scale=5.0)
    with torch.no_grad(), capture(sd_den, ["mid_block", "*attn2"]) as sd_cap:
        sample(sd_den, sd_cond, shape=(1, 4, 32, 32), num_steps=3, seed=seed, scheduler="euler")
    frame = sd_cap.frame()
    _write_csv(frame, out / "sdxl_capture.csv")
    findings["sdxl"] = {"tensors": len(frame), "branches": sorted(frame.branch.unique().tolist())}


# ----------------------------------------------------------------------------------------- 2. locality maps
def _scene(pipe: Any, seed: int) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    from scorescope.experiments.feature_profile import clevr_scene

    return clevr_scene(pipe, seed, k=3)


def _probe_model(den: Any, pipe: Any, seed: int, plan: DemoPlan, *, pixels: bool) -> dict[str, Any]:
    """Conditional locality and the CPC residual (and pixel locality when ``pixels``) on the seeded scene."""
    import probes

    cond, x0, info = _scene(pipe, seed)
    seeds = [seed + s for s in plan.probe_seeds]
    out: dict[str, Any] = {"scene": info}
    if pixels:
        size = int(pipe.unet.config.sample_size)
        x, y = info["locations"][0]
        where = [(size // 2, size // 2), (round(y * (size - 1)), round(x * (size - 1))), (2, 2)][: plan.pixels]
        out["pixel"] = probes.pixel_locality(den, cond, t=list(plan.levels), seeds=seeds, pixels=where, x0=x0)
    out["conditional"] = probes.conditional_locality(den, cond, t=list(plan.levels), seeds=seeds, x0=x0, radius=RADIUS,
                                                     maps=("jvp",), directions=plan.directions)
    out["cpc"] = probes.cpc_residual(den, cond, t=list(plan.levels), seeds=seeds, x0=x0, radius=RADIUS)
    return out


def _locality_maps(out: Path, loaded: Any, name: str, seed: int, plan: DemoPlan, overwrite: bool,
                   findings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pixel / conditional locality and CPC residual of the demo's model: tables and exported maps."""
    from scorescope.export import export_maps

    res = _probe_model(loaded.denoiser, loaded.pipeline, seed, plan, pixels=True)
    _write_csv(res["pixel"].frame(), out / "pixel_locality.csv")
    _write_csv(res["conditional"].frame(), out / "conditional_locality.csv")
    _write_csv(res["cpc"].frame(), out / "cpc_residual.csv")
    maps = out / "maps"
    exported = {}
    for key, result in (("pixel", res["pixel"]), ("conditional", res["conditional"]), ("cpc", res["cpc"])):
        done = export_maps(result, maps, width="two-column", formats=plan.formats, overwrite=overwrite)
        for files in done.paths.values():
            exported[key] = next(p for p in files if p.suffix == ".png")
    pix = res["pixel"].frame()
    side = pix[(pix.metric == "side_50") & (pix.pixel_row == pix.pixel_row.iloc[0]) & (pix.pixel_col == pix.pixel_col.iloc[0])]
    findings["maps"] = {"figures": exported, "scene": res["scene"], "size": int(loaded.pipeline.unet.config.sample_size),
                        "pixels": plan.pixels,
                        "side_50": {float(t): float(v) for t, v in side.groupby("t").value.mean().items()}}
    return {name: res}


# ------------------------------------------------------------------------------------- 3. locality by model
def _summary_rows(model: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean over conditioners and seeds of the in-region fraction, and the CPC residual, per noise level."""
    rows = []
    cf = res["conditional"].frame()
    for t, v in cf[cf.metric == "in_region"].groupby("t").value.mean().items():
        rows.append({"model": model, "t": float(t), "metric": "in_region", "value": float(v)})
    for t, v in cf[cf.metric == "n_eff"].groupby("t").value.mean().items():
        rows.append({"model": model, "t": float(t), "metric": "n_eff", "value": float(v)})
    pf = res["cpc"].frame()
    means = pf[(pf.metric == "cpc_residual") & (pf.stat == "mean")]
    for t, v in means.groupby("t").value.mean().items():
        rows.append({"model": model, "t": float(t), "metric": "cpc_residual", "value": float(v)})
    return rows


def _locality_by_model(out: Path, name: str, done: dict[str, dict[str, Any]], seed: int, plan: DemoPlan,
                       progress: bool | None, findings: dict[str, Any]) -> None:
    import pandas as pd

    from interp import figures
    from interp.models.registry import load_model
    from scorescope.export import write_figure

    rows = []
    with _bar(len(STUDY_MODELS), "locality by model", progress) as tick:
        for model in STUDY_MODELS:
            if model not in done:
                loaded = load_model(model)
                done[model] = _probe_model(loaded.denoiser, loaded.pipeline, seed, plan, pixels=False)
            rows += _summary_rows(model, done[model])
            tick(f"done {model}")
    frame = pd.DataFrame(rows)
    _write_csv(frame, out / "locality_by_model.csv")
    figs = {}
    for metric, label, lim in (("in_region", f"in-region fraction of ‖∂D/∂c_j‖ (radius {RADIUS})", (0.0, 1.0)),
                               ("cpc_residual", "CPC residual (relative)", (0.0, None))):
        fig = figures.metric_heatmap(frame, metric, index="model", columns="t", fmt=".2f", vmin=lim[0], vmax=lim[1], label=label)
        figs[metric] = write_figure(fig, out / "figures", formats=plan.formats, stem=f"locality_{metric}")["png"]
    findings["by_model"] = {"frame": frame, "figures": figs}


# ------------------------------------------------------------------------------------------- 4. length table
def _length(out: Path, seed: int, plan: DemoPlan, overwrite: bool, progress: bool | None,
            findings: dict[str, Any]) -> Any:
    import pandas as pd

    from interp.clevr.evaluate import evaluate_length, sample_grid
    from interp.models.registry import load_model
    from scorescope.experiments.track import length_rows
    from scorescope.export import length_figure, write_figure

    work = out / "work" / _work_name(plan, seed) / "length"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    grids = {}
    with _bar(len(STUDY_MODELS) * len(plan.counts), "length generalisation", progress) as tick:
        for model in STUDY_MODELS:
            pipe = load_model(model).pipeline
            res = evaluate_length(pipe, list(plan.counts), n=plan.n, seed=seed, steps=plan.steps, batch_size=plan.n,
                                  model_name=model, keep_images=min(4, plan.n), parts=work / model, progress=tick)
            rows += length_rows(model, -1, res["per_k"], seed)
            grids[model] = sample_grid(res, out / "figures" / f"samples_{model}.png")
    frame = pd.DataFrame(rows)[["model", "k", "metric", "value", "lo", "hi", "n", "seed"]]
    _write_csv(frame, out / "length.csv")
    figs = {}
    for metric in ("recall", "count_acc"):
        fig = length_figure(frame, metric, train_range=TRAIN_RANGE)
        figs[metric] = write_figure(fig, out / "figures", formats=plan.formats, stem=f"length_{metric}")["png"]
    findings["length"] = {"frame": frame, "figures": figs, "grids": grids}
    return frame


# ------------------------------------------------------------------------------------------ 5. layer profile
def _profile(out: Path, seed: int, plan: DemoPlan, overwrite: bool, progress: bool | None,
             findings: dict[str, Any]) -> None:
    import pandas as pd

    from interp import figures
    from scorescope.experiments.feature_profile import run_profile
    from scorescope.export import write_figure

    frames = []
    units = len(plan.profile_models) * len(plan.profile_levels) * len(plan.probe_seeds)
    with _bar(units, "layer profile", progress) as tick:
        for model in plan.profile_models:
            res = run_profile(model, out=out / "work" / _work_name(plan, seed) / f"profile-{model}", sites=plan.profile_sites,
                              t=list(plan.profile_levels), seeds=[seed + s for s in plan.probe_seeds], radius=RADIUS, figures=False,
                              directions=plan.profile_directions,
                              overwrite=overwrite, progress=tick)
            frames.append(res.frame.assign(model=model))
    frame = pd.concat(frames, ignore_index=True)
    frame["layer"] = frame["model"] + " " + frame["layer"].astype(str) + " (" + frame["height"].astype(str) + "²)"
    _write_csv(frame, out / "profile.csv")
    figs = {}
    for metric, label, lim in (("in_region", f"in-region fraction of ‖∂h/∂c_j‖ (radius {RADIUS})", (0.0, 1.0)),
                               ("n_eff", "conditioners per position (n_eff)", (1.0, 3.0))):
        fig = figures.layer_heatmap(frame, metric, layer="layer", fmt=".2f", vmin=lim[0], vmax=lim[1], label=label,
                                    width="two-column")
        figs[metric] = write_figure(fig, out / "figures", formats=plan.formats, stem=f"profile_{metric}")["png"]
    findings["profile"] = {"frame": frame, "figures": figs}


# -------------------------------------------------------------------------------------------- 6. intervention
def _intervention(out: Path, seed: int, plan: DemoPlan, length: Any, overwrite: bool, progress: bool | None,
                  findings: dict[str, Any]) -> None:
    import pandas as pd

    from interp import figures
    from scorescope.experiments.locality_sweep import run_locality_sweep
    from scorescope.export import write_figure

    units = len(plan.sweep_only) * len(plan.sweep_counts)
    with _bar(units, "intervention on exp2", progress) as tick:
        # The unpatched models are the length table's own rows (same scenes, noise and n), so the sweep runs only
        # the interventions.
        res = run_locality_sweep("exp2", counts=list(plan.sweep_counts), out=out / "work" / _work_name(plan, seed) / "intervention",
                                 n=plan.n, seed=seed, steps=plan.steps, only=list(plan.sweep_only), references=[],
                                 batch_size=plan.n, keep_images=min(4, plan.n), overwrite=overwrite, progress=tick)
    metrics = ("recall", "count_acc", "placement_acc", "mean_extra")
    rows = []
    ref = length[length["k"].isin(plan.sweep_counts) & length["metric"].isin(metrics)]
    for model, part in ref.groupby("model", sort=False):
        label = "exp2 unpatched" if model == "exp2" else f"{model} (reference)"
        wide = part.pivot_table(index="k", columns="metric", values="value").reset_index()
        for r in wide.to_dict("records"):
            rows.append({"intervention": label, **{m: r[m] for m in ("k", *metrics)}})
    for r in res.frame.to_dict("records"):
        rows.append({"intervention": f"exp2 + {r['intervention']}", **{m: r[m] for m in ("k", *metrics)}})
    order = ["exp2 unpatched"] + [f"exp2 + {o}" for o in plan.sweep_only] + [f"{m} (reference)" for m in STUDY_MODELS if m != "exp2"]
    frame = pd.DataFrame(rows)
    frame = frame.set_index("intervention").loc[[o for o in order if o in set(frame["intervention"])]].reset_index()
    _write_csv(frame, out / "intervention.csv")
    fig = figures.intervention_heatmap(frame, "recall", fmt=".2f", label="recall", width="two-column")
    findings["intervention"] = {"frame": frame, "figures": {"recall": write_figure(fig, out / "figures", formats=plan.formats, stem="intervention_recall")["png"]}}


__all__ = ["DemoPlan", "FULL", "QUICK", "STUDY_MODELS", "default_model", "run_demo"]
