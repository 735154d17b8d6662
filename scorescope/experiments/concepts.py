"""Concept geometry and composition of colours on a colour-conditioned CLEVR model (SCIENCE.md §1, §2).

The paper's feature-space claim makes a testable prediction: concepts whose difference vectors
``d_i = μ_i − μ_∅`` are orthogonal compose, concepts whose ``d_i`` overlap do not (the predecessor's
example: yellow + blue composes, yellow + red does not). ``scorescope features concepts`` measures both sides
on the colour model and correlates them:

1. **Concept directions** (:func:`difference_vectors`). Concept *i* is "one object of colour *i*". Its mean
   activation ``μ_i`` at a site is averaged over ``L`` seeded random locations (the renderer's placement rule,
   :func:`concept_locations`) and ``S`` forward-process inputs ``x_t`` (one per noise seed, ``x₀ = 0`` as in
   every probe, :func:`interp.inputs.forward_samples`); every colour sees the *same* locations and the same
   inputs, so only the colour differs. ``μ_∅`` is the null condition on the same inputs, and
   ``d_i = mean_{l,s} h(x_s | colour i at l) − mean_s h(x_s | ∅)`` — the difference vectors are averaged
   first, the cosine taken after (:func:`cosine_matrix`; a zero ``d_i`` raises instead of giving a NaN). The
   activation is flattened over channels and positions.
   Sites: module paths of the U-Net (default: every trunk block's output, :func:`default_sites`) and
   ``"pixel"``: the denoiser's x̂₀ prediction in pixel space *(ours)*. x̂₀, ε̂ and v̂ differ by an affine map
   whose ``x_t`` term cancels in ``μ_i − μ_∅``, so the pixel cosines are the same in any parametrisation.
   Beside them, the **palette** directions *(ours)*, the predecessor's "RGB difference vector" argument with
   no model in it (:func:`palette_directions`), under two baselines: ``"floor"`` — each colour's renderer RGB
   minus the empty floor's mean RGB (the null condition in pixel space is the empty floor) — and ``"black"``
   — the RGB vector itself. The two disagree (yellow and blue are nearly anti-parallel from the floor, far
   from parallel from black), so both are reported.
2. **Block structure** (:func:`block_structure`, *ours*): average-linkage hierarchical clustering of the
   colours on the distance ``1 − |cos|``; the number of clusters ``k ∈ [2, n − 1]`` is the one that maximises
   the **block score** = mean ``|cos|`` within clusters (off-diagonal) − mean ``|cos|`` across clusters.
3. **Composition success** (:func:`composition_row`). For each colour pair ``(i, j)`` the model samples ``n``
   two-object scenes (DDIM, seeded) asking for colour ``i`` at one and ``j`` at the other of two seeded random
   well-separated locations (:func:`pair_scenes`: the same ``n`` location pairs and the same sampling noise
   for every colour pair, so pairs are a paired comparison; which location gets ``i`` alternates between
   scenes). Objects are detected (:func:`interp.clevr.detect.detect`), matched to the requests (Hungarian,
   :data:`interp.clevr.metrics.MATCH_RADIUS`) and their colour read off the image at the detected centre
   (:func:`interp.clevr.attributes.read_colours`, as in ``colour_acc``). A scene **succeeds** when both
   requested locations are filled *and* both objects have the requested colours. ``success`` = successes /
   ``n`` with a Wilson 95 % interval. Pairs ``i = j`` (two objects of one colour) are included by default as a
   reference row (``same = True``) but never enter the correlation (their cosine is 1 by definition).
4. **Correlation** (:func:`spearman_bootstrap`): Spearman's ρ between ``|cos(d_i, d_j)|`` and success over the
   pairs ``i < j``, per site and noise level, with a seeded percentile bootstrap interval over pairs. The
   prediction is ρ < 0. The interval resamples pairs only; the binomial noise of each success estimate is not
   propagated (it is in each pair's own Wilson interval).
5. **Per-colour control** *(ours)*: a pair can fail because one colour is hard to draw or to read (brown, the
   palette colour closest to others), not because the two interfere. With the ``i = j`` rows, each colour's
   per-object success is ``p_i = √success(i, i)``; a pair expected under independence succeeds with
   ``p_i · p_j`` (:func:`independence_baseline`), and ``excess = success − p_i · p_j`` is what interference
   would lower. ``correlation_excess`` is ρ between ``|cos|`` and ``excess`` (absent without the ``i = j`` rows).

Output folder (claimed with :func:`interp.io.prepare_output_dir`, kind :data:`KIND`): ``settings.json`` (the
fixed settings; resuming with others is refused), ``parts/pair_<i>_<j>.json`` — one per finished colour pair
(written atomically; its presence is the completion index, so an interrupted run resumes without resampling),
``concepts.json`` (the result, as for ``--json``), figures ``cosines_<site>.png`` (one seaborn heatmap per
noise level, labelled) and ``palette.png`` (both baselines), and ``scatter.png`` (success against ``|cos|`` for
the best layer, pixel space and both palettes).

JSON layout: ``cosines[site][t] = n × n`` (rows and columns in ``settings.colours`` order; ``t`` as a string
such as ``"0.5"``), ``norms[site][t] = n`` (‖d_i‖), ``blocks[site][t]`` (:func:`block_structure`),
``palette[baseline] = {"directions", "cosine", "blocks", "correlation", "definition"}`` (``baseline``:
``"floor"``, ``"black"``), ``pairs`` (rows: ``colour_i``, ``colour_j``,
``same``, ``n``, ``success``, ``success_lo``, ``success_hi``, ``placed``, ``colour_given_placed``,
``abs_cos[site][t]``, ``abs_cos_palette[baseline]``, and with the ``i = j`` rows ``expected_independent``,
``excess``), ``correlation[site][t] = {"rho", "lo", "hi", "n_pairs", "n_boot"}``, ``correlation_excess`` (same
layout; ``palette[baseline]["correlation_excess"]`` beside it), ``best`` (the layer
site and ``t`` with the lowest ρ — chosen after looking, so biased towards a strong effect), ``settings``,
``machine``, ``wall_s``.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from interp.clevr.evaluate import OptionError  # a ValueError naming the CLI option at fault, shared by the CLEVR commands
from scorescope.experiments.study import check_json_option, claim_study_folder
from interp.io import atomic_write_json

KIND = "features-concepts"
"""Marker kind of the output folder."""

PIXEL = "pixel"
"""The site name of the denoiser's x̂₀ prediction (pixel space)."""

#: Fixed settings of an output folder: a resume must match them (colours, sites, t, seeds and locations may change:
#: the cosines are recomputed on every run, and pairs not yet sampled are added).
FIXED = ("model", "config_hash", "n", "seed", "steps", "match_radius", "detector", "guidance_scale", "alternate")


# --------------------------------------------------------------------------------------------- options
def parse_colours(spec: str | Sequence[str] | None) -> list[str]:
    """Colour names (comma-separated or a list; ``None`` = all 8) in :data:`COLOUR_NAMES` order, checked.

    Raises ``ValueError`` for an unknown name (suggesting the closest), a repeated name, or fewer than two.
    """
    from interp.clevr.render import COLOUR_NAMES  # the encoder's vocabulary, in its order; numpy only (fast refusals)

    if spec is None:
        return list(COLOUR_NAMES)
    names = [c.strip().lower() for c in (spec.split(",") if isinstance(spec, str) else spec) if c.strip()]
    for c in names:
        if c not in COLOUR_NAMES:
            close = difflib.get_close_matches(c, COLOUR_NAMES, n=1, cutoff=0.0)
            raise ValueError(f"unknown colour {c!r}; did you mean {close[0]!r}? (colours: {', '.join(COLOUR_NAMES)})")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ValueError(f"colours {dup} are listed twice; give each colour once")
    if len(names) < 2:
        raise ValueError(f"need at least two colours to compare, got {names}")
    return [c for c in COLOUR_NAMES if c in names]


def parse_levels(spec: str | Sequence[float]) -> list[float]:
    """Noise fractions (``"0.1,0.5,0.9"`` or a list) in ``[0, 1]``, unique, in the given order."""
    try:
        values = [float(v) for v in spec.split(",") if v.strip()] if isinstance(spec, str) else [float(v) for v in spec]
    except ValueError:
        raise ValueError(f"cannot parse noise levels {spec!r}: give fractions in [0, 1] such as '0.1,0.5,0.9'") from None
    if not values:
        raise ValueError("no noise levels given: pass fractions in [0, 1] such as '0.1,0.5,0.9'")
    bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise ValueError(f"noise levels t are fractions of the schedule in [0, 1] (0 clean, 1 pure noise); got {bad}")
    return list(dict.fromkeys(values))


def is_colour_model(pipe: Any) -> bool:
    """Whether the pipeline's location encoder takes colours (:class:`~interp.models.clevr_colour.ColourLocationEncoder`)."""
    from interp.models.clevr_colour import ColourLocationEncoder

    return isinstance(getattr(pipe, "location_encoder", None), ColourLocationEncoder)


def default_sites(unet: torch.nn.Module) -> list[str]:
    """Every trunk block's output that can depend on the conditioning, in execution order, and ``pixel``.

    That is ``down_blocks.*`` from the first one with cross-attention (``attentions``) on, ``mid_block`` and
    every ``up_blocks.*``: a down block before any cross-attention never sees the conditioning, so its
    ``d_i`` is exactly zero and has no cosine.
    """
    blocks = list(getattr(unet, "down_blocks", ()))
    first = next((i for i, b in enumerate(blocks) if getattr(b, "attentions", None)), len(blocks))
    downs = [f"down_blocks.{i}" for i in range(first, len(blocks))]
    mid = ["mid_block"] if getattr(unet, "mid_block", None) is not None else []
    ups = [f"up_blocks.{i}" for i in range(len(getattr(unet, "up_blocks", ())))]
    return downs + mid + ups + [PIXEL]


def resolve_sites(unet: torch.nn.Module, spec: str | Sequence[str] | None) -> list[str]:
    """Sites (``"pixel"``, module paths or globs; comma-separated or a list; ``None`` = :func:`default_sites`).

    Globs expand to every matching module, in the model's order; repeats are dropped. Raises ``ValueError``
    with one line naming the closest real paths for a site that matches nothing.
    """
    from interp.site import close_matches, module_paths

    if spec is None:
        return default_sites(unet)
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ValueError("no sites given: pass module paths or globs (e.g. 'mid_block,up_blocks.*') and/or 'pixel'")
    paths = module_paths(unet)
    out: list[str] = []
    for item in items:
        if item == PIXEL:
            hits = [PIXEL]
        elif item in paths:
            hits = [item]
        else:
            import fnmatch

            hits = [p for p in paths if any(ch in item for ch in "*?[") and fnmatch.fnmatchcase(p, item)]
            if not hits:
                close = close_matches(item, paths, n=4)
                raise ValueError(f"unknown site {item!r}: no module matches; closest: {', '.join(close) or '(none)'} "
                                 f"(or {PIXEL!r} for the x̂₀ prediction)")
        out += [h for h in hits if h not in out]
    return out


# ---------------------------------------------------------------------------------- concept directions
def concept_locations(n_locations: int, seed: int) -> np.ndarray:
    """``(L, 2)`` seeded random single-object locations (the renderer's border margin); depends only on the arguments."""
    from interp.clevr.render import sample_positions

    if n_locations < 1:
        raise ValueError(f"need at least one location per concept, got {n_locations}")
    rng = np.random.default_rng([seed, 1, 17])
    return np.concatenate([sample_positions(rng, 1) for _ in range(n_locations)])


def colour_concepts(pipe: Any, colours: Sequence[str], locations: np.ndarray) -> dict[str, list[Any]]:
    """Colour name → one single-object :class:`~interp.Conditioning` per location (the same locations for every colour)."""
    return {c: [pipe.conditioning(loc[None], colours=[c]) for loc in np.asarray(locations)] for c in colours}


def difference_vectors(
    den: Any,
    sites: Sequence[str],
    concepts: Mapping[str, Sequence[Any]],
    t: float,
    seeds: int | Sequence[int],
    *,
    null: Any,
    x0: Tensor | None = None,
) -> dict[str, Tensor]:
    """``d_i = mean_{l,s} h(x_s | concept i at l) − mean_s h(x_s | ∅)`` at every site, in float64.

    Args:
        den: the denoiser. sites: exact module paths and/or :data:`PIXEL` (the x̂₀ prediction).
        concepts: name → the conditionings averaged for that concept (e.g. one per location); every concept
            is evaluated on the same inputs.
        t: one noise fraction in ``[0, 1]``. seeds: forward-process noise seeds (a count or a list), shared by
            every concept and by the null condition.
        null: the null conditioning. x0: clean image(s) for the forward process (default zeros).

    Returns:
        site → ``(n_concepts, D_site)`` (rows in ``concepts`` order; ``D`` = the flattened activation size).
    """
    from interp.capture import read_activations
    from interp.inputs import as_seeds, forward_samples

    seed_list = as_seeds(seeds)
    x_t, ts = forward_samples(den, t, seed_list, x0=x0)
    layers = [s for s in sites if s != PIXEL]
    S = x_t.shape[0]

    def mean_features(conds: Sequence[Any]) -> dict[str, Tensor]:
        """Mean over conditionings × seeds of each site's flattened activation: site → ``(D,)`` float64."""
        rows = [c.to(den.device) for c in conds for _ in range(S)]
        x = x_t.repeat(len(conds), 1, 1, 1)  # row r = conditioning r // S on input r % S
        out: dict[str, Tensor] = {}
        if layers:
            acts = read_activations(den, layers, rows, x_t=x, timestep=ts)
            out.update({s: acts[s].detach().double().flatten(1).mean(0) for s in layers})
        if PIXEL in sites:
            x0_hat = den.to_x0(den.predict(x, ts, rows), x, ts)
            out[PIXEL] = x0_hat.detach().double().flatten(1).mean(0)
        return out

    with torch.no_grad():
        # the null on a batch of the same shape as each concept's: where the conditioning cannot reach a site,
        # μ_i and μ_∅ are then computed identically and d_i is exactly zero (not float32 batch-size noise)
        sizes = {len(conds) for conds in concepts.values()}
        if len(sizes) != 1:
            raise ValueError(f"every concept needs the same number of conditionings (one per location), got {sorted(sizes)}")
        base = mean_features([null] * sizes.pop())
        per = [mean_features(list(conds)) for conds in concepts.values()]
    return {s: torch.stack([p[s] - base[s] for p in per]) for s in sites}


def cosine_matrix(d: Tensor, names: Sequence[str], *, where: str = "") -> Tensor:
    """Cosines ``(n, n)`` of the rows of ``d (n, D)``: symmetric, unit diagonal, float64.

    Raises ``ValueError`` naming the concepts whose difference vector is zero (relative to the largest
    ``‖d_i‖``; all zero counts too), whose cosine would be 0/0 — the rule of :func:`probes.concept_cosines`.
    """
    d = d.double()
    norms = d.norm(dim=1)
    scale = float(norms.max()) if len(norms) else 0.0
    flat = [n for n, v in zip(names, norms.tolist()) if v == 0.0 or v <= 1e-10 * scale]
    if flat:
        raise ValueError(
            f"concept(s) {flat} have a zero difference vector d_i = mu_i - mu_null{' at ' + where if where else ''}: "
            "their activation does not change from the null condition, so the cosine is undefined; drop them, "
            "or choose another site or noise level"
        )
    cos = (d @ d.T) / (norms[:, None] * norms[None, :])
    cos = ((cos + cos.T) / 2).clamp(-1.0, 1.0)  # a BLAS Gram matrix need not be bit-symmetric
    cos.fill_diagonal_(1.0)
    return cos


#: Palette baselines: what a colour's RGB is measured from (see the module docstring).
PALETTE_BASELINES: dict[str, str] = {"floor": "renderer RGB minus the empty floor's mean RGB",
                                     "black": "renderer RGB (from black)"}


def palette_directions(colours: Sequence[str], baseline: str = "floor") -> np.ndarray:
    """``(n, 3)`` renderer RGB of each colour minus the baseline (:data:`PALETTE_BASELINES`): pixel space without a model."""
    from interp.clevr.render import COLOURS, floor

    if baseline not in PALETTE_BASELINES:
        raise ValueError(f"baseline must be one of {list(PALETTE_BASELINES)}, got {baseline!r}")
    base = floor(32).reshape(3, -1).mean(1).astype(np.float64) if baseline == "floor" else np.zeros(3)
    return np.array([COLOURS[c] for c in colours], dtype=np.float64) - base[None]


def block_structure(cos: Tensor | np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Average-linkage clusters on ``1 − |cos|`` and the block score (see the module docstring).

    Returns ``{"k", "clusters" (lists of names), "within", "across", "score", "mean_offdiag", "order"}``
    (``order``: the dendrogram's leaf order); ``within`` / ``across`` are mean ``|cos|`` over off-diagonal
    pairs in one cluster / in different clusters.
    """
    from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
    from scipy.spatial.distance import squareform

    a = np.abs(np.asarray(cos, dtype=np.float64))
    n = len(names)
    off = ~np.eye(n, dtype=bool)
    mean_off = float(a[off].mean()) if n > 1 else float("nan")
    if n < 3:
        return {"k": 1, "clusters": [list(names)], "within": mean_off, "across": float("nan"), "score": float("nan"),
                "mean_offdiag": mean_off, "order": list(names)}
    dist = squareform(np.clip(1.0 - a, 0.0, None), checks=False)
    tree = linkage(dist, method="average")
    best: dict[str, Any] | None = None
    for k in range(2, n):
        labels = fcluster(tree, k, criterion="maxclust")
        same = (labels[:, None] == labels[None, :]) & off
        diff = labels[:, None] != labels[None, :]
        if not same.any() or not diff.any():
            continue
        within, across = float(a[same].mean()), float(a[diff].mean())
        if best is None or within - across > best["score"]:
            clusters = [[names[i] for i in range(n) if labels[i] == c] for c in sorted(set(labels))]
            best = {"k": int(len(clusters)), "clusters": clusters, "within": within, "across": across,
                    "score": within - across}
    if best is None:  # tied distances (every |cos| equal) merge all at one height: no block structure to find
        best = {"k": 1, "clusters": [list(names)], "within": mean_off, "across": float("nan"), "score": float("nan")}
    best["mean_offdiag"] = mean_off
    best["order"] = [names[i] for i in leaves_list(tree)]
    return best


# ------------------------------------------------------------------------------------------ composition
def colour_pairs(colours: Sequence[str], *, same: bool = True) -> list[tuple[str, str]]:
    """Pairs ``(i, j)`` with ``i < j`` in ``colours`` order, plus ``(i, i)`` when ``same``."""
    return [(a, b) for x, a in enumerate(colours) for y, b in enumerate(colours) if x < y or (same and x == y)]


def pair_scenes(n: int, seed: int) -> list[np.ndarray]:
    """``n`` seeded pairs of well-separated locations ``(2, 2)`` (the renderer's placement rule); the same for every pair."""
    from interp.clevr.evaluate import request_sets

    return request_sets(2, n, seed)


def scene_colours(i: int, j: int, n: int) -> list[np.ndarray]:
    """Colour indices per scene: ``(i, j)`` in even scenes, ``(j, i)`` in odd ones (neither location favours a colour)."""
    return [np.array([i, j] if s % 2 == 0 else [j, i], dtype=np.int64) for s in range(n)]


def score_scenes(images: Tensor | np.ndarray, locations: Sequence[np.ndarray], colours: Sequence[np.ndarray],
                 detector: Any = None) -> list[dict[str, Any]]:
    """Score two-object scenes: detect, match to the requests, read each matched object's colour.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1]. locations: per scene the requested ``(k, 2)`` centres.
        colours: per scene the requested ``(k,)`` palette indices. detector: a ``DetectorConfig`` (default one).

    Returns:
        per scene ``{"success", "placed", "requested", "read"}``: ``placed`` — every request matched a detection
        within :data:`~interp.clevr.metrics.MATCH_RADIUS`; ``read`` — the colour name read at each request's
        matched detection (``None`` where unmatched); ``success`` — placed and every read colour as requested.
    """
    from interp.clevr.attributes import read_colours
    from interp.clevr.detect import DetectorConfig, detect
    from interp.clevr.metrics import MATCH_RADIUS, match
    from interp.models.clevr_colour import COLOUR_NAMES

    det = detect(images, detector or DetectorConfig())
    read = read_colours(images, det.positions)
    scenes = []
    for req, want, pos, got in zip(locations, colours, det.positions, read):
        found: list[str | None] = [None] * len(req)
        for r, d in match(req, pos, MATCH_RADIUS):
            found[r] = COLOUR_NAMES[int(got[d])]
        placed = all(f is not None for f in found)
        ok = placed and all(f == COLOUR_NAMES[int(w)] for f, w in zip(found, want))
        scenes.append({"success": bool(ok), "placed": bool(placed), "requested": [COLOUR_NAMES[int(w)] for w in want],
                       "read": found})
    return scenes


def composition_row(
    pipe: Any,
    colour_i: str,
    colour_j: str,
    *,
    n: int,
    seed: int,
    steps: int,
    batch_size: int = 64,
    detector: Any = None,
) -> dict[str, Any]:
    """Sample ``n`` scenes asking for ``colour_i`` and ``colour_j`` and score them (:func:`score_scenes`).

    Returns ``{"row": {colour_i, colour_j, same, n, successes, success, success_lo, success_hi, placed,
    colour_given_placed}, "scenes": [...]}`` (``success_lo`` / ``_hi``: Wilson 95 %; ``colour_given_placed``:
    successes among placed scenes, ``None`` when none was placed).
    """
    from interp.clevr.evaluate import generate
    from interp.clevr.metrics import wilson_interval
    from interp.models.clevr_colour import COLOUR_NAMES

    i, j = COLOUR_NAMES.index(colour_i), COLOUR_NAMES.index(colour_j)
    locs = pair_scenes(n, seed)
    cols = scene_colours(i, j, n)
    imgs = generate(pipe, locs, seed=seed, steps=steps, batch_size=batch_size, colours=cols)
    scenes = score_scenes(imgs, locs, cols, detector)
    k = sum(s["success"] for s in scenes)
    n_placed = sum(s["placed"] for s in scenes)
    lo, hi = wilson_interval(k, n)
    row = {"colour_i": colour_i, "colour_j": colour_j, "same": colour_i == colour_j, "n": n, "successes": int(k),
           "success": k / n, "success_lo": lo, "success_hi": hi, "placed": n_placed / n,
           "colour_given_placed": k / n_placed if n_placed else None}
    return {"row": row, "scenes": scenes}


def independence_baseline(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """``(colour_i, colour_j) → p_i · p_j`` with ``p_c = √success(c, c)`` for every pair ``i ≠ j`` whose two
    ``i = j`` rows are present (module docstring, item 5)."""
    single = {r["colour_i"]: math.sqrt(r["success"]) for r in rows if r["colour_i"] == r["colour_j"]}
    return {(r["colour_i"], r["colour_j"]): single[r["colour_i"]] * single[r["colour_j"]] for r in rows
            if r["colour_i"] != r["colour_j"] and r["colour_i"] in single and r["colour_j"] in single}


# ---------------------------------------------------------------------------------------- correlation
def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=-1)  # average ranks for ties, as Spearman's ρ needs


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (NaN for a constant row)."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's ρ (Pearson correlation of average ranks); NaN when either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    return float(_pearson_rows(_ranks(x), _ranks(y)))


def spearman_bootstrap(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Spearman's ρ with a seeded percentile bootstrap interval over the paired observations.

    Returns ``{"rho", "lo", "hi", "n_pairs", "n_boot"}``; ``n_boot`` counts the resamples with a defined ρ
    (a resample in which one side is constant has none and is left out). With fewer than three pairs, or a
    constant side, ``rho`` is NaN and so is the interval.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got n_boot={n_boot}, level={level}")
    rho = spearman(x, y)
    n = len(x)
    if n < 3 or not math.isfinite(rho):
        return {"rho": rho, "lo": float("nan"), "hi": float("nan"), "n_pairs": n, "n_boot": 0}
    idx = np.random.default_rng([seed, 23]).integers(0, n, size=(n_boot, n))
    boots = _pearson_rows(_ranks(x[idx]), _ranks(y[idx]))
    boots = boots[np.isfinite(boots)]
    if not len(boots):
        return {"rho": rho, "lo": float("nan"), "hi": float("nan"), "n_pairs": n, "n_boot": 0}
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"rho": rho, "lo": float(lo), "hi": float(hi), "n_pairs": n, "n_boot": int(len(boots))}


# ------------------------------------------------------------------------------------------------ run
@dataclass
class ConceptsResult:
    """What :func:`run_concepts` did: the JSON-ready result, pairs run / resumed, files written, wall time."""

    data: dict[str, Any]
    ran: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0


def _tkey(t: float) -> str:
    return f"{t:g}"


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return v


def run_concepts(
    model: str = "colour",
    *,
    out: str | Path,
    sites: str | Sequence[str] | None = None,
    t: str | Sequence[float] = (0.1, 0.5, 0.9),
    seeds: int = 4,
    locations: int = 8,
    n: int = 32,
    steps: int = 25,
    colours: str | Sequence[str] | None = None,
    seed: int = 0,
    same: bool = True,
    n_boot: int = 2000,
    json_path: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    batch_size: int = 64,
    figures: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ConceptsResult:
    """Run (or resume) the concept study; see the module docstring for what it computes and writes.

    Args:
        model: a colour-conditioned CLEVR model for :func:`interp.models.registry.load_model` (``colour``).
        out: the output folder (resumable). sites: :func:`resolve_sites`. t: noise fractions for the cosines.
        seeds: forward-process noise seeds ``0 … seeds − 1`` per concept. locations: random locations per concept.
        n: scenes per colour pair. steps: DDIM steps. colours: a subset of colour names (default all 8).
        seed: seeds the concept locations, the scene locations and the sampling noise.
        same: also sample the ``i = j`` pairs (reference rows; never in the correlation).
        n_boot: bootstrap resamples of the correlation. json_path: also write the result there (atomically).
        overwrite: claim a non-empty folder that is not this command's (nothing in it is deleted).
        device: where the model runs (default CUDA when present). figures: write the figures.
        progress: called with one line per step.

    Raises:
        OptionError: a ``ValueError`` whose ``option`` names the CLI option at fault (bad colours, sites, t, seeds,
            locations, n, steps, seed, n_boot, a non-colour model, an unwritable ``json_path``, or an ``out``
            holding a run with other fixed settings).
        FileExistsError: ``out`` is another command's or a user's folder and ``overwrite`` is off.
    """
    import interp.clevr.evaluate  # noqa: F401 - the sampling loop's module, imported before the long part starts
    from interp.clevr.detect import DetectorConfig
    from interp.clevr.metrics import MATCH_RADIUS
    from interp.models.registry import load_model
    from scorescope.experiments.locality_sweep import machine

    t0 = time.perf_counter()
    say = progress or (lambda line: None)
    checks: list[tuple[str, Callable[[], Any]]] = [
        ("--colours", lambda: parse_colours(colours)),
        ("--t", lambda: parse_levels(t)),
    ]
    parsed = []
    for option, check in checks:
        try:
            parsed.append(check())
        except ValueError as err:
            raise OptionError(str(err), option) from None
    names, levels = parsed
    for option, value, low in (("--seeds", seeds, 1), ("--locations", locations, 1), ("--n", n, 1), ("--steps", steps, 1),
                               ("--seed", seed, 0), ("--bootstrap", n_boot, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise OptionError(f"{option.lstrip('-')} must be an integer >= {low} ({option}), got {value!r}", option)
    check_json_option(json_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        loaded = load_model(model, device=device)
    except (ValueError, FileNotFoundError) as err:
        raise OptionError(str(err), "--model") from None
    pipe = loaded.pipeline
    if loaded.family != "clevr" or not is_colour_model(pipe):
        enc = type(getattr(pipe, "location_encoder", pipe)).__name__
        raise OptionError(f"concepts needs a colour-conditioned CLEVR model (e.g. 'colour'), got {model!r} ({enc} takes no colours)",
                          "--model")
    try:
        site_list = resolve_sites(pipe.unet, sites)
    except ValueError as err:
        raise OptionError(str(err), "--sites") from None
    den = pipe.denoiser()
    detector = DetectorConfig()
    settings = json.loads(json.dumps({
        "model": str(model), "config_hash": den.metadata()["config_hash"], "n": n, "seed": seed, "steps": steps,
        "match_radius": MATCH_RADIUS, "detector": dict(detector.__dict__), "guidance_scale": None, "alternate": True,
        "sampler": "ddim", "colours": names, "sites": site_list, "t": levels, "seeds": list(range(seeds)),
        "locations": locations, "same": same, "n_boot": n_boot, "x0": "zeros",
    }))
    out, parts = claim_study_folder(out, KIND, settings, FIXED, settings_file="settings.json", may_change="colours, sites, t, seeds, locations and --same",
                                    overwrite=overwrite)

    # 1. concept directions and cosines (seconds: recomputed on every run)
    locs = concept_locations(locations, seed)
    concepts = colour_concepts(pipe, names, locs)
    null = next(iter(concepts.values()))[0].null()
    cosines: dict[str, dict[str, Tensor]] = {s: {} for s in site_list}
    norms: dict[str, dict[str, list[float]]] = {s: {} for s in site_list}
    for level in levels:
        d = difference_vectors(den, site_list, concepts, level, seeds, null=null)
        for s in site_list:
            try:
                cosines[s][_tkey(level)] = cosine_matrix(d[s], names, where=f"site {s!r} (t={level:g})")
            except ValueError as err:
                raise OptionError(str(err), "--sites") from None
            norms[s][_tkey(level)] = d[s].norm(dim=1).tolist()
        say(f"cosines at t={level:g}: {len(site_list)} sites")
    pal = {b: palette_directions(names, b) for b in PALETTE_BASELINES}
    pal_cos = {b: cosine_matrix(torch.from_numpy(v), names, where=f"the palette ({b})") for b, v in pal.items()}

    # 2. composition success per pair (long: resumable, one part file per pair)
    rows: list[dict[str, Any]] = []
    result = ConceptsResult(data={})
    for a, b in colour_pairs(names, same=same):
        part = parts / f"pair_{a}_{b}.json"
        if part.exists():
            rec = json.loads(part.read_text())
            if (rec["row"]["colour_i"], rec["row"]["colour_j"]) != (a, b):
                raise ValueError(f"{part} holds the pair {rec['row']['colour_i']}+{rec['row']['colour_j']}, not {a}+{b}")
            result.skipped.append((a, b))
            say(f"skip {a}+{b} (done)")
        else:
            u0 = time.perf_counter()
            rec = composition_row(pipe, a, b, n=n, seed=seed, steps=steps, batch_size=batch_size, detector=detector)
            rec["wall_s"] = round(time.perf_counter() - u0, 2)
            atomic_write_json(part, rec)
            result.ran.append((a, b))
            say(f"done {a}+{b}: success {rec['row']['successes']}/{n} ({rec['wall_s']:.1f} s)")
        rows.append(dict(rec["row"]))

    # 3. correlation of |cos| with success over the pairs i < j
    idx = {c: x for x, c in enumerate(names)}
    for row in rows:
        ia, ib = idx[row["colour_i"]], idx[row["colour_j"]]
        row["abs_cos"] = {s: {tk: abs(float(m[ia, ib])) for tk, m in per.items()} for s, per in cosines.items()}
        row["abs_cos_palette"] = {b: abs(float(m[ia, ib])) for b, m in pal_cos.items()}
    cross = [r for r in rows if not r["same"]]
    succ = np.array([r["success"] for r in cross])

    def corr(xs: Sequence[float]) -> dict[str, Any]:
        return spearman_bootstrap(np.asarray(xs), succ, n_boot=n_boot, seed=seed)

    correlation = {s: {tk: corr([r["abs_cos"][s][tk] for r in cross]) for tk in per} for s, per in cosines.items()}
    pal_corr = {b: corr([r["abs_cos_palette"][b] for r in cross]) for b in pal}
    expected = independence_baseline(rows)
    correlation_excess = pal_excess = None
    if cross and all((r["colour_i"], r["colour_j"]) in expected for r in cross):
        for r in cross:
            r["expected_independent"] = expected[(r["colour_i"], r["colour_j"])]
            r["excess"] = r["success"] - r["expected_independent"]
        exc = np.array([r["excess"] for r in cross])

        def corr_excess(xs: Sequence[float]) -> dict[str, Any]:
            return spearman_bootstrap(np.asarray(xs), exc, n_boot=n_boot, seed=seed)

        correlation_excess = {s: {tk: corr_excess([r["abs_cos"][s][tk] for r in cross]) for tk in per}
                              for s, per in cosines.items()}
        pal_excess = {b: corr_excess([r["abs_cos_palette"][b] for r in cross]) for b in pal}
    layer_cands = [(c["rho"], s, tk) for s, per in correlation.items() if s != PIXEL for tk, c in per.items()
                   if math.isfinite(c["rho"])]
    best = None
    if layer_cands:
        rho, s, tk = min(layer_cands)
        best = {"site": s, "t": tk, "rho": rho, "rule": "lowest rho over layer sites and t (chosen after looking)"}

    data = {
        "settings": settings,
        "concept_locations": locs.tolist(),
        "cosines": {s: {tk: m.tolist() for tk, m in per.items()} for s, per in cosines.items()},
        "norms": norms,
        "blocks": {s: {tk: block_structure(m, names) for tk, m in per.items()} for s, per in cosines.items()},
        "palette": {b: {"directions": pal[b].tolist(), "cosine": pal_cos[b].tolist(),
                        "blocks": block_structure(pal_cos[b], names), "correlation": pal_corr[b],
                        "correlation_excess": pal_excess[b] if pal_excess else None,
                        "definition": PALETTE_BASELINES[b]} for b in pal},
        "pairs": rows,
        "correlation": correlation,
        "correlation_excess": correlation_excess,
        "best": best,
        "machine": dict(machine(), device=device),
        "units": {"ran": len(result.ran), "skipped": len(result.skipped)},
        "out": str(out),
    }
    data = _nan_to_none(data)  # JSON has no NaN: undefined values (a constant side's ρ) become null
    if figures:
        for s in site_list:
            result.paths[f"cosines:{s}"] = cosine_figure(data, s, out / f"cosines_{_file_name(s)}.png")
        result.paths["palette"] = cosine_figure(data, "palette", out / "palette.png")
        if cross and best is not None:
            result.paths["scatter"] = scatter_figure(data, out / "scatter.png")
    result.wall_s = time.perf_counter() - t0
    data["wall_s"] = round(result.wall_s, 1)
    data["compute_s_pairs"] = round(sum(json.loads((parts / f"pair_{a}_{b}.json").read_text()).get("wall_s", 0.0)
                                        for a, b in colour_pairs(names, same=same)), 1)
    result.data = data
    result.paths["json"] = atomic_write_json(out / "concepts.json", data)
    if json_path is not None:
        result.paths["json_copy"] = atomic_write_json(json_path, data)
    return result


# ---------------------------------------------------------------------------------------------- figures
def _file_name(site: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", site)


def cosine_figure(data: Mapping[str, Any], site: str, path: str | Path) -> Path:
    """Seaborn heatmaps of a site's cosine matrix, one panel per noise level (``site="palette"``: one per baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from interp.clevr.evaluate import save_figure

    names = data["settings"]["colours"]
    if site == "palette":
        panels = [(f"palette from {b}", p["cosine"], p["blocks"]) for b, p in data["palette"].items()]
    else:
        panels = [(f"t = {tk}", m, data["blocks"][site][tk]) for tk, m in data["cosines"][site].items()]
    n = len(names)
    # the colour bar gets its own narrow column: a bar on the last panel would shrink that panel alone
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(0.5 * n * len(panels) + 1.5, 0.5 * n + 1.2), squeeze=False,
                             gridspec_kw={"width_ratios": [1.0] * len(panels) + [0.05]})
    for p, (ax, (title, m, blocks)) in enumerate(zip(axes[0], panels)):
        last = p == len(panels) - 1
        sns.heatmap(np.asarray(m, dtype=float), vmin=-1, vmax=1, cmap="RdBu_r", annot=n <= 10, fmt=".2f",
                    annot_kws={"size": 6}, xticklabels=names, yticklabels=names, square=True, cbar=last,
                    cbar_ax=axes[0][-1] if last else None, ax=ax)
        ax.set_title(f"{title}\nblock score {blocks['score']:.2f} (k={blocks['k']})" if blocks.get("score") is not None
                     else title, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"cos(d_i, d_j) at {site}" if site != "palette" else "palette cos(d_i, d_j)", fontsize=9)
    return save_figure(fig, path)


def scatter_figure(data: Mapping[str, Any], path: str | Path) -> Path:
    """Composition success against ``|cos(d_i, d_j)|`` over the pairs ``i < j``: best layer, pixel space, palette."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from interp.clevr.evaluate import save_figure

    best = data["best"]
    cross = [r for r in data["pairs"] if not r["same"]]
    panels = [(f"{best['site']} (t={best['t']}, best layer)", [r["abs_cos"][best["site"]][best["t"]] for r in cross],
               data["correlation"][best["site"]][best["t"]])]
    if PIXEL in data["cosines"] and best["t"] in data["cosines"][PIXEL]:
        panels.append((f"pixel x̂₀ (t={best['t']})", [r["abs_cos"][PIXEL][best["t"]] for r in cross],
                       data["correlation"][PIXEL][best["t"]]))
    for b, p in data["palette"].items():
        panels.append((f"palette RGB from {b}", [r["abs_cos_palette"][b] for r in cross], p["correlation"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, (title, xs, c) in zip(axes[0], panels):
        df = pd.DataFrame({"abs_cos": xs, "success": [r["success"] for r in cross],
                           "pair": [f"{r['colour_i'][:3]}+{r['colour_j'][:3]}" for r in cross]})
        sns.scatterplot(data=df, x="abs_cos", y="success", ax=ax)
        for r, (x, y, lab) in zip(cross, df[["abs_cos", "success", "pair"]].itertuples(index=False)):
            ax.annotate(lab, (x, y), fontsize=5, alpha=0.7, xytext=(2, 2), textcoords="offset points")
        rho = "n/a" if c["rho"] is None else f"{c['rho']:.2f}"
        ci = "" if c["lo"] is None else f" [{c['lo']:.2f}, {c['hi']:.2f}]"
        ax.set_title(f"{title}\nSpearman ρ = {rho}{ci}", fontsize=8)
        ax.set_xlabel("|cos(d_i, d_j)|")
        ax.set_ylabel("composition success")
        ax.set_ylim(-0.03, 1.03)
    return save_figure(fig, path)


__all__ = [
    "FIXED", "KIND", "PIXEL", "ConceptsResult", "OptionError", "block_structure", "colour_concepts", "colour_pairs",
    "composition_row", "concept_locations", "independence_baseline", "cosine_figure", "cosine_matrix", "default_sites", "difference_vectors",
    "PALETTE_BASELINES", "is_colour_model", "palette_directions", "pair_scenes", "parse_colours", "parse_levels", "resolve_sites",
    "run_concepts", "scatter_figure", "scene_colours", "score_scenes", "spearman", "spearman_bootstrap",
]
