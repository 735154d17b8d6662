"""Where in a network is the conditional score local in *feature* space? A layer × noise-level profile.

SCIENCE.md §1 ("feature-space version") and §3.4: a model can be conditionally local in the coordinates of a
learned feature ``h_L`` even where it is not in pixels, and the layers where it is are where composition can
happen. :func:`feature_profile` measures, at every chosen layer ``L`` and noise fraction ``t``, for each
conditioner ``c_j`` of a scene, the per-channel, per-position dependence ``G_j(c, p) = ‖∂h_L[c, p]/∂c_j‖``
(forward-mode JVP, :func:`probes.features.layer_dependence`: one pass per chunk of directions serves every
layer at once) and summarises it *(ours)*:

* **spatial conditional locality** at the layer's own resolution: ``in_region`` — the share of the channel-norm
  map ``‖G_j(·, p)‖₂`` within ``radius`` of ``c_j``'s location (``radius`` in normalised units, so it is the
  same part of the image at every resolution), with ``leak_other`` / ``leak_background`` the rest
  (:func:`probes.summaries.region_fractions`); ``mass`` the map's total; ``in_region_flat`` the value a flat
  map would give on that grid (the disc's share of the cells: the chance level);
* **channel sparsity** of the channel masses ``m_c = Σ_p G_j(c, p)`` (:func:`probes.summaries.channel_sparsity`):
  ``channel_support_<q>`` — the fraction of channels holding ``q`` (default 90 %) of the mass;
  ``channel_pr`` — the participation ratio over channels and ``channel_pr_fraction = channel_pr / C``;
  ``channel_hoyer`` — Hoyer's sparsity over channels (1: one channel, 0: all equal);
* **effective number of conditioners** per position, ``n_eff`` (one row per layer, ``t``, seed): the
  participation ratio over ``j`` of the channel-norm maps, mass-weighted over positions
  (:func:`probes.summaries.effective_conditioners`): 1 where each position listens to one conditioner, ``k``
  where all are mixed.

A conditioner with no dependence at all at a layer (``mass = 0``: the layer runs before any conditioner enters
the network) has undefined fractions: those rows are NaN, not 0.

Sites *(ours)*: comma-separated module paths or globs. A glob keeps the modules it matches that run in a
forward pass and return a spatial map (``(B, C, h, w)`` or ``(B, h·w, C)`` tokens), and of those only the
outermost (``*resnets*`` gives each ``resnets.i`` block, not its ``conv1`` / ``norm1`` / ``time_emb_proj``
inside it); an exact path must itself be such a module. ``"auto"``: every cross-attention layer and every
residual block of the network (diffusers ``attn2`` / ``ResnetBlock2D``, the local U-Net's
``LocalCrossAttention`` / ``LocalResBlock``). Layers are ordered by execution.

The CLI's scenes *(ours)*: seed ``s`` draws a CLEVR scene of ``k = 3`` objects (:func:`clevr_scene`): positions
with :func:`interp.clevr.render.sample_positions` kept ``min_separation = 0.4`` apart (so the default radius
0.2 discs are disjoint and "in region" means one object's region), random colours (the colour model's tokens
use them), rendered as the clean image ``x_0``; the input is the forward-process sample ``x_t`` of that image
with noise seed ``s``. Three objects: inside Exp1's training range (1–3 listed objects) and three times what
Exp2 was conditioned on — the question is exactly what a model does with several conditioners.

:func:`run_profile` (``scorescope features profile``) adds the output folder (claimed with
:func:`interp.io.prepare_output_dir`), one CSV part per ``(site, t, seed)`` (:func:`probes.sweep.unit_key`, written
atomically: its presence is the completion index, so an interrupted run resumes), ``results.csv``, ``profile.png``
(one layer × t heatmap panel per metric of :data:`HEATMAP_METRICS`) and the JSON summary.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from interp import Conditioning, Denoiser
from interp.clevr.evaluate import OptionError  # a ValueError naming the CLI option at fault, shared by the CLEVR commands
from scorescope.experiments.study import check_json_option, claim_study_folder, load_clevr_model
from interp.io import atomic_write_json
from interp.site import SiteError, resolve_paths, spatial_view

KIND = "features-profile"
"""Marker kind of the output folder."""

AUTO = "auto"
DEFAULT_K = 3
MIN_SEPARATION = 0.4
DEFAULT_RADIUS = 0.2
DEFAULT_DIRECTIONS = 8
DEFAULT_Q = 0.9

#: Per-conditioner metrics (one row per site, t, seed, conditioner); ``n_eff`` is per site, t, seed.
CONDITIONER_METRICS = ("mass", "in_region", "in_region_flat", "leak_other", "leak_background", "channel_support", "channel_pr",
                       "channel_pr_fraction", "channel_hoyer")
#: Metrics drawn as layer × t heatmaps (mean over conditioners and seeds).
HEATMAP_METRICS = ("in_region", "channel_support", "channel_pr_fraction", "channel_hoyer", "n_eff")
#: Settings a resumed folder must share (sites, noise levels and seeds may change).
FIXED = ("model", "config_hash", "weights_hash", "k", "min_separation", "radius", "directions", "q", "input")


# ------------------------------------------------------------------------------------------------ sites
@dataclass(frozen=True)
class ProfileSite:
    """One profiled layer: module ``path``, short ``label``, execution ``order``, its map ``(channels, height, width)``."""

    path: str
    label: str
    order: int
    channels: int
    height: int
    width: int


def short_label(path: str) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` → ``down1.attn0``; ``mid_block.resnets.1`` → ``mid.res1``."""
    s = re.sub(r"\.transformer_blocks\.0\.attn2$", "", path)
    s = re.sub(r"^(down|up)_blocks\.(\d+)\.", r"\1\2.", s)
    s = re.sub(r"^mid_block\.", "mid.", s)
    s = re.sub(r"attentions\.(\d+)", r"attn\1", s)
    return re.sub(r"resnets\.(\d+)", r"res\1", s)


def auto_sites(unet: nn.Module) -> list[str]:
    """Every cross-attention layer and residual block of ``unet`` (module-tree order; see the module docstring)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    from interp.models.clevr_local import LocalCrossAttention, LocalResBlock

    out = []
    for path, m in unet.named_modules():
        cross = (isinstance(m, Attention) and bool(getattr(m, "is_cross_attention", False))) or isinstance(m, LocalCrossAttention)
        if path and (cross or isinstance(m, (ResnetBlock2D, LocalResBlock))):
            out.append(path)
    return out


def _patterns(sites: str | Sequence[str]) -> list[str]:
    if isinstance(sites, str):
        sites = sites.split(",")
    pats = [s.strip() for s in sites if isinstance(s, str) and s.strip()]
    if not pats:
        raise ValueError("sites is empty: give module paths or globs such as '*attn2,*resnets*', or 'auto'")
    return pats


def _spatial_shape(out: Any, hw: tuple[int, int]) -> tuple[int, int, int] | None:
    from interp.hooks import primary_tensor

    act = primary_tensor(out)
    if not isinstance(act, Tensor) or act.dim() not in (3, 4):
        return None
    if act.dim() == 3:
        try:
            act = spatial_view(act, hw)
        except ValueError:
            return None
    return int(act.shape[1]), int(act.shape[2]), int(act.shape[3])


def profile_sites(den: Denoiser, sites: str | Sequence[str], cond: Conditioning) -> list[ProfileSite]:
    """Resolve site patterns to the profiled layers, in execution order (rules: the module docstring).

    One recording forward pass (no gradient) at ``t = 0.5`` on a zero input learns which matched modules run,
    in which order, and the shape of their maps.

    Raises:
        ValueError: ``sites`` empty; an exact path that does not run or has no spatial map; a glob none of whose
            matches does. :class:`interp.site.SiteError`: a pattern that matches no module (lists the closest paths).
    """
    from interp.hooks import HookSet

    pats = _patterns(sites)
    unet = den.unet
    matched: dict[str, list[str]] = {}
    for p in pats:
        matched[p] = auto_sites(unet) if p == AUTO else [path for path, _ in resolve_paths(unet, p)]
        if p == AUTO and not matched[p]:
            raise ValueError(f"sites 'auto' found no cross-attention layer or residual block in {type(unet).__name__}; "
                             "name module paths or globs instead")
    modules = dict(unet.named_modules())
    seen: dict[str, tuple[int, int, int] | None] = {}
    size = int(unet.config.sample_size)
    hw = (size, size)

    def recorder(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if path not in seen:
                seen[path] = _spatial_shape(out, hw)
        return hook

    x = torch.zeros(1, int(unet.config.in_channels), size, size, device=den.device, dtype=den.dtype)
    with HookSet() as hooks, torch.no_grad():
        for path in {q for qs in matched.values() for q in qs}:
            hooks.forward(modules[path], recorder(path))
        den.predict(x, den.timestep(0.5), cond.to(den.device))
    order = {path: i for i, path in enumerate(seen)}
    keep: list[str] = []
    for p, paths in matched.items():
        ok = [q for q in paths if seen.get(q) is not None]
        if p != AUTO and not any(ch in p for ch in "*?["):
            if not ok:
                why = "does not run in a forward pass" if p not in seen else "does not return a spatial map"
                raise ValueError(f"site {p!r} {why}; choose a layer whose output is (B, C, h, w) or (B, h*w, C)")
        elif not ok:
            raise ValueError(f"site {p!r} matches {len(paths)} modules but none runs in a forward pass and returns a "
                             "spatial map; choose other layers")
        outer = [q for q in ok if not any(q.startswith(o + ".") for o in ok if o != q)]
        keep += [q for q in outer if q not in keep]
    keep.sort(key=order.__getitem__)
    return [ProfileSite(q, short_label(q), order[q], *seen[q]) for q in keep]  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- scenes
def clevr_scene(pipe: Any, seed: int, *, k: int = DEFAULT_K, min_separation: float = MIN_SEPARATION) -> tuple[Conditioning, Tensor, dict[str, Any]]:
    """The profile's scene of ``seed``: ``k`` objects, their conditioning and the clean image.

    Returns:
        ``(cond, x0 (3, H, W) in [-1, 1], info)`` with ``info = {"locations": [[x, y], ...], "colours": [...]}``;
        colour-conditioned pipelines get the scene's colours in their tokens. Depends only on ``(seed, k)``.
    """
    from interp.clevr.render import COLOUR_NAMES, random_scene, render, sample_positions
    from interp.models.clevr_colour import ColourLocationEncoder

    rng = np.random.default_rng([seed, k, 1729])
    pos = sample_positions(rng, k, min_separation=min_separation)
    scene = random_scene(rng, [k], positions=[pos])
    colours = [int(c) for c in scene.colours[0, :k]]
    size = int(pipe.unet.config.sample_size)
    x0 = torch.from_numpy(render(scene, size).to_model_range()[0]).float()
    if isinstance(pipe.location_encoder, ColourLocationEncoder):
        cond = pipe.conditioning(pos.tolist(), colours=colours)
    else:
        cond = pipe.conditioning(pos.tolist())
    info = {"locations": [[round(float(v), 6) for v in p] for p in pos], "colours": [COLOUR_NAMES[c] for c in colours]}
    return cond, x0, info


# ---------------------------------------------------------------------------------------------- profile
def _check_directions(directions: int | str) -> int | str:
    if directions == "all":
        return directions
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ValueError(f"directions must be 'all' or a positive integer, got {directions!r}")
    return directions


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    if isinstance(seeds, (int, str)):
        raise ValueError(f"seeds must be a list of integers >= 0, got {seeds!r}; pass e.g. [0, 1]")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"seeds must be integers >= 0, got {s!r} in {list(seeds)!r}")
        out.append(int(s))
    if not out:
        raise ValueError("seeds is empty: give at least one seed, e.g. [0]")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds repeat: {out}; each seed is one sample, give each once")
    return out


def _check_radius(radius: float) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius must be a finite number > 0 (normalised units, e.g. 0.2), got {radius!r}")
    return float(radius)


def _rows(site: ProfileSite, chans: Tensor, cond: Conditioning, radius: float, q: float, **index: Any) -> list[dict[str, Any]]:
    """Tidy rows of one site's maps ``chans (k, C_L, h, w)``."""
    from probes.summaries import channel_sparsity, effective_conditioners, region_fractions

    spatial = chans.double().pow(2).sum(1).sqrt()  # (k, h, w): Frobenius norm of the Jacobian block at each position
    mass = spatial.flatten(1).sum(-1)
    per = {"mass": mass}
    per.update(region_fractions(spatial, cond.locations, radius))
    # the in-region fraction a flat map would have on this grid: the chance level to read in_region against
    per["in_region_flat"] = region_fractions(torch.ones_like(spatial), cond.locations, radius)["in_region"]
    sp = channel_sparsity(chans, q)
    per.update(sp)
    per["channel_pr_fraction"] = sp["channel_pr"] / site.channels
    base = dict(site=site.path, layer=site.label, layer_index=site.order, channels=site.channels,
                height=site.height, width=site.width, **index)
    rows = []
    for name in CONDITIONER_METRICS:
        for j in range(cond.k):
            v = float(per[name][j])
            if name != "mass" and float(mass[j]) == 0.0:
                v = math.nan  # no dependence at all: a fraction of nothing is undefined
            rows.append(dict(base, metric=name, value=v, conditioner=j, label=cond.labels[j]))
    _, n_eff = effective_conditioners(spatial)
    rows.append(dict(base, metric="n_eff", value=float(n_eff) if float(mass.sum()) > 0 else math.nan,
                     conditioner=math.nan, label=None))
    return rows


def feature_profile(
    den: Denoiser,
    cond: Conditioning,
    *,
    sites: str | Sequence[str],
    t: Sequence[float],
    seeds: Sequence[int],
    radius: float = DEFAULT_RADIUS,
    directions: int | str = DEFAULT_DIRECTIONS,
    q: float = DEFAULT_Q,
    x0: Tensor | None = None,
    chunk_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """The feature-space locality profile of ``den`` on one scene (metrics: the module docstring).

    Args:
        den: the denoiser. cond: ``k >= 1`` located conditioners (``cond.locations`` set).
        sites: module paths / globs / ``"auto"``, a list or comma-separated (:func:`profile_sites`).
        t: noise fractions in ``[0, 1]``. seeds: forward-process noise seeds; one set of rows per seed.
        radius: in-region disc radius, normalised units. directions: JVP directions per conditioner: ``"all"``
            (exact) or ``n`` random ones (default 8, *ours*: a cost choice; the support of the dependence is exact
            either way, its per-channel magnitudes are estimated).
        q: mass share of ``channel_support`` (metric ``channel_support``; ``q`` is in ``df.attrs``).
        x0: the clean image ``(C, H, W)`` noised to ``x_t`` (default zeros: pure noise at every ``t``).
        chunk_size: JVP directions per forward pass. dtype: dtype of ``x_t`` (float64 for exact tests).
        progress: called with one line per ``(t, seed)``.

    Returns:
        tidy frame, one row per ``(site, t, seed, metric[, conditioner])``: columns ``site, layer, layer_index,
        channels, height, width, t, timestep, seed, metric, value, conditioner, label``; ``df.attrs`` holds the
        settings. Same inputs and seeds → the same numbers.

    Raises:
        ValueError: bad ``sites`` / ``t`` / ``seeds`` / ``radius`` / ``directions`` / ``q``, or no locations.
    """
    from interp.inputs import as_levels, check_conditioning, check_locations, forward_samples
    from probes.features import layer_dependence

    check_conditioning(cond)
    if cond.locations is None:
        raise ValueError("the profile needs located conditioners (cond.locations): the in-region fraction is about them")
    check_locations(cond.locations)
    levels = as_levels(list(t) if not isinstance(t, (int, float)) else t)
    seed_list = _check_seeds(seeds)
    radius = _check_radius(radius)
    directions = _check_directions(directions)
    if not 0 < q <= 1:
        raise ValueError(f"q must lie in (0, 1], got {q}")
    cond = cond.to(den.device)
    layers = profile_sites(den, sites, cond)
    paths = [s.path for s in layers]
    rows: list[dict[str, Any]] = []
    for level in levels:
        for seed in seed_list:
            x_t, ts = forward_samples(den, level, [seed], x0=x0, dtype=dtype)
            per_j = [layer_dependence(den, paths, cond, j, x_t=x_t, timestep=ts, directions=directions,
                                      chunk_size=chunk_size) for j in range(cond.k)]
            for site in layers:
                chans = torch.stack([d[site.path] for d in per_j]).cpu()  # (k, C_L, h, w)
                rows += _rows(site, chans, cond, radius, q, t=level, timestep=int(ts), seed=seed)
            if progress:
                progress(f"t={level} seed={seed}: {len(layers)} layers")
    df = pd.DataFrame(rows, columns=["site", "layer", "layer_index", "channels", "height", "width", "t", "timestep",
                                     "seed", "metric", "value", "conditioner", "label"])
    df.attrs["settings"] = {**den.metadata(), "radius": radius, "directions": str(directions), "q": q, "k": cond.k,
                            "sites": paths}
    return df


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class ProfileResult:
    """What :func:`run_profile` did: the frame, units run / resumed, the files written, the wall time."""

    frame: pd.DataFrame
    ran: list[tuple[str, float, int]] = field(default_factory=list)
    skipped: list[tuple[str, float, int]] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0


def weights_hash(module: nn.Module) -> str:
    """SHA-1 (16 hex) of a module's parameters and buffers: two snapshots of one config differ here."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_options(*, t: Sequence[float], seeds: Sequence[int], radius: float, directions: int | str, k: int,
                  sites: str | Sequence[str]) -> tuple[list[float], list[int], float, int | str]:
    """Refuse bad settings before any model is loaded; :class:`OptionError` names the CLI option."""
    from interp.inputs import as_levels

    checks: list[tuple[str, Callable[[], Any]]] = [
        ("--t", lambda: as_levels(list(t))),
        ("--seeds", lambda: _check_seeds(seeds)),
        ("--radius", lambda: _check_radius(radius)),
        ("--directions", lambda: _check_directions(directions)),
        ("--sites", lambda: _patterns(sites)),
    ]
    out = []
    for option, fn in checks:
        try:
            out.append(fn())
        except ValueError as err:
            raise OptionError(str(err), option) from None
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4:
        # random placement 0.4 apart inside [0.1, 0.9]² gets crowded beyond 4 (it placed 4 for each of 300 seeds tried)
        raise OptionError(f"k must be an integer in 1..4 (objects per scene, kept {MIN_SEPARATION} apart), got {k!r}", "--k")
    return out[0], out[1], out[2], out[3]


def run_profile(
    model: str,
    *,
    out: str | Path,
    sites: str | Sequence[str] = AUTO,
    t: Sequence[float] = (0.1, 0.5, 0.9),
    seeds: Sequence[int] = (0,),
    k: int = DEFAULT_K,
    radius: float = DEFAULT_RADIUS,
    directions: int | str = DEFAULT_DIRECTIONS,
    json_path: str | Path | None = None,
    device: str | None = None,
    overwrite: bool = False,
    figures: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ProfileResult:
    """Run (or resume) the profile of a CLEVR model (see the module docstring for the scenes and files).

    Args:
        model: a name or folder for :func:`interp.models.registry.load_model` (exp1, exp2, exp3, colour,
            tiny-clevr, a pipeline folder, a training-run folder).
        out: the folder (``parts/``, ``results.csv``, ``profile.png``: one layer × t heatmap per metric).
        sites, t, radius, directions: as :func:`feature_profile`. seeds: scene + noise seeds, one unit each.
        k: objects per scene. json_path: also write rows, settings, metadata, machine and wall time there.
        device: where the model runs (default: CUDA when present). overwrite: claim a non-empty folder that is
            not this command's (nothing in it is deleted). figures: write ``profile.png``.
        progress: called with one line per unit.

    Raises:
        OptionError: a ``ValueError`` naming the CLI option at fault (``--t``, ``--seeds``, ``--radius``,
            ``--directions``, ``--sites``, ``--k``, ``--json``, ``--model``, ``--out`` for a folder holding a
            profile with other fixed settings).
        FileExistsError: ``out`` is a user's or another command's folder and ``overwrite`` is off.
    """
    from probes.sweep import atomic_write_csv, unit_key

    t0 = time.perf_counter()
    levels, seed_list, radius, directions = check_options(t=t, seeds=seeds, radius=radius, directions=directions, k=k, sites=sites)
    check_json_option(json_path)
    from interp.distributed import rank_device

    device = rank_device(device)  # several processes (torchrun): cuda:LOCAL_RANK each
    loaded = load_clevr_model(model, needs="the feature profile", device=device)
    pipe, den = loaded.pipeline, loaded.denoiser
    scenes = {s: clevr_scene(pipe, s, k=k) for s in seed_list}
    try:
        layers = profile_sites(den, sites, scenes[seed_list[0]][0])
    except (ValueError, SiteError) as err:
        raise OptionError(" ".join(str(err).split()), "--sites") from None
    settings = {
        "model": str(model), "config_hash": den.metadata()["config_hash"], "weights_hash": weights_hash(den.unet),
        "k": k, "min_separation": MIN_SEPARATION, "radius": radius, "directions": str(directions), "q": DEFAULT_Q,
        "input": "forward process of the rendered scene (x0 = render(scene of seed), noise seed = seed)",
        "sites": [s.path for s in layers], "t": levels, "seeds": seed_list,
    }
    from interp.distributed import distributed

    with distributed() as dist:
        out, parts = dist.on_main(lambda: claim_study_folder(out, KIND, settings, FIXED, settings_file="profile.json",
                                                             may_change="sites, noise levels and seeds", overwrite=overwrite))
        result = ProfileResult(frame=pd.DataFrame())
        compute_s = 0.0

        def part_of(path: str, level: float, seed: int) -> Path:
            return parts / f"{unit_key(path, level, seed)}.csv"

        # A unit is one (seed, t): one forward-mode pass serves all its layers, so layers are not split apart.
        units = [(seed, level) for seed in seed_list for level in levels]
        pending = dist.pending(units, done=lambda u: all(part_of(s.path, u[1], u[0]).exists() for s in layers))
        for seed, level in units:
            done = [s for s in layers if (seed, level) not in pending or part_of(s.path, level, seed).exists()]
            result.skipped.extend((s.path, level, seed) for s in done)
            if done and progress and dist.is_main:
                progress(f"skip t={level} seed={seed}: {len(done)} layers done")
        for seed, level in dist.share(pending):
            cond, x0, _ = scenes[seed]
            todo = [s for s in layers if not part_of(s.path, level, seed).exists()]
            u0 = time.perf_counter()
            df = feature_profile(den, cond, sites=[s.path for s in todo], t=[level], seeds=[seed], radius=radius,
                                 directions=directions, x0=x0)
            wall = time.perf_counter() - u0
            compute_s += wall
            df.insert(0, "model", str(model))
            for s in todo:
                atomic_write_csv(df[df["site"] == s.path], part_of(s.path, level, seed))
                result.ran.append((s.path, level, seed))
            dist.part_written()
            if progress:
                progress(f"done t={level} seed={seed}: {len(todo)} layers ({wall:.1f} s)"
                         + (f" (rank {dist.rank})" if dist.world_size > 1 else ""))
        dist.barrier()  # every rank's parts are on disk
        # Read back from the parts: identical dtypes for fresh and resumed units, whichever rank ran them.
        frames = [pd.read_csv(part_of(s.path, level, seed)) for seed in seed_list for level in levels for s in layers]
        main = dist.is_main
    frame = pd.concat(frames, ignore_index=True)
    order = {s.path: i for i, s in enumerate(layers)}
    frame = frame.sort_values(["t", "seed"], kind="stable").sort_values("site", key=lambda c: c.map(order), kind="stable")
    frame = frame.reset_index(drop=True)
    result.frame = frame
    result.wall_s = time.perf_counter() - t0
    if not main:  # rank 0 writes the table, figure and JSON; every rank returns the whole frame
        return result
    result.paths["csv"] = out / "results.csv"
    atomic_write_csv(frame, out / "results.csv")
    if figures:
        result.paths["figure"] = heatmap(frame, HEATMAP_METRICS, out / "profile.png", title=str(model))
    result.wall_s = time.perf_counter() - t0
    if json_path is not None:
        from scorescope.experiments.locality_sweep import machine

        summary = {
            "settings": settings,
            "metadata": {**den.metadata(), "layers": [s.__dict__ for s in layers],
                         "scenes": {str(s): scenes[s][2] for s in seed_list},
                         "metrics": {"per_conditioner": list(CONDITIONER_METRICS), "per_layer": ["n_eff"]}},
            "rows": json_rows(frame),
            "machine": dict(machine(), device=device),
            "wall_s": round(result.wall_s, 2),
            "compute_s": round(compute_s, 2),
            "units": {"ran": len(result.ran), "skipped": len(result.skipped)},
            "out": str(out),
        }
        result.paths["json"] = atomic_write_json(json_path, summary, indent=None)
    return result


#: Columns of the JSON's rows; the per-layer facts (label, order, channels, height, width) are in ``metadata.layers``.
JSON_COLUMNS = ("model", "site", "t", "seed", "metric", "value", "conditioner")


def json_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The frame's :data:`JSON_COLUMNS` as records: values to 6 significant digits (``results.csv`` keeps them all),
    NaN as ``null``, ``conditioner`` an int (``null`` on per-layer rows)."""
    rows = []
    for r in frame[list(JSON_COLUMNS)].itertuples(index=False):
        v, j = float(r.value), float(r.conditioner)
        rows.append({"model": r.model, "site": r.site, "t": float(r.t), "seed": int(r.seed), "metric": r.metric,
                     "value": None if math.isnan(v) else float(f"{v:.6g}"), "conditioner": None if math.isnan(j) else int(j)})
    return rows


def summary_table(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Layer × t table of ``metric`` (mean over conditioners and seeds), rows in execution order."""
    sel = frame[frame["metric"] == metric]
    # groupby keeps layers whose values are all NaN (no dependence: drawn blank), unlike pivot_table's dropna
    grid = sel.groupby(["layer_index", "layer", "height", "t"])["value"].mean().unstack("t")
    grid.index = [f"{lab} ({h}²)" for _, lab, h in grid.index]
    return grid


def heatmap(frame: pd.DataFrame, metrics: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Layer × t heatmaps of :func:`summary_table`, one annotated panel per metric (written atomically).

    Plain matplotlib ``imshow`` (seaborn's heatmap took 3× longer to build here); NaN cells (no dependence) are blank.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from interp.clevr.evaluate import save_figure

    n_layers = frame["site"].nunique()
    k = int(frame["conditioner"].max()) + 1 if frame["conditioner"].notna().any() else 2
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.6 + 2.4 * len(metrics), 1.4 + 0.3 * n_layers), squeeze=False)
    for i, (ax, metric) in enumerate(zip(axes[0], metrics)):
        grid = summary_table(frame, metric).astype(float)
        # fractions live in [0, 1]; n_eff in [1, k]
        lo, hi = (1.0, max(2.0, float(k))) if metric == "n_eff" else (0.0, 1.0)
        im = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
        for (r, c), v in np.ndenumerate(grid.to_numpy()):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if (v - lo) / (hi - lo) < 0.6 else "black")
        ax.set_xticks(range(grid.shape[1]), [f"{v:g}" for v in grid.columns])
        ax.set_yticks(range(grid.shape[0]), list(grid.index) if i == 0 else [""] * grid.shape[0])
        fig.colorbar(im, ax=ax, fraction=0.08)
        ax.set_title(metric.replace("_", " "), fontsize=9)
        ax.set_xlabel("t")
        ax.set_ylabel("layer (execution order)" if i == 0 else "")
    fig.suptitle(f"feature-space locality profile{': ' + title if title else ''} (mean over conditioners and seeds; "
                 "blank: no dependence on any conditioner)", fontsize=9)
    return save_figure(fig, path)


__all__ = [
    "AUTO", "CONDITIONER_METRICS", "FIXED", "HEATMAP_METRICS", "JSON_COLUMNS", "KIND", "OptionError", "ProfileResult", "ProfileSite",
    "auto_sites", "check_options", "clevr_scene", "feature_profile", "heatmap", "profile_sites", "run_profile",
    "json_rows", "short_label", "summary_table", "weights_hash",
]
