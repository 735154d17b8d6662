"""SDXL style + content: conditional locality in latent space and in the U-Net's feature space (SCIENCE.md §1, §2).

The paper's SDXL claim: in latent ("pixel") space the score is spatially local but mostly *not* conditionally
local — a style phrase moves every pixel — while in the U-Net's learned features there is evidence of local
conditional structure. ``scorescope features sdxl`` measures both on a prompt set that crosses styles with
contents (:data:`STYLES` × :data:`CONTENTS`, plus the user's own phrases). Each prompt is
``"<style>, <content>"`` encoded by :func:`interp.models.sdxl.prompt_conditioning`: two conditioners (token spans).

For every prompt, noise fraction ``t`` and seed (one forward-process sample ``x_t`` per seed,
:func:`interp.inputs.forward_samples`; conditional branch, the network's raw ε prediction):

* **ablation maps** ``Δ_j(i) = ‖h_i(x|c) − h_i(x|c∖j)‖`` over channels, with phrase ``j`` dropped
  (:meth:`interp.Conditioning.drop`: its tokens are masked out of cross-attention), at the U-Net's output
  (``site = "output"``: the latent space, the same map as :func:`probes.conditional_locality` with
  ``maps=("ablation",)``) and at each chosen site (the same map as :func:`probes.feature_dependence` with
  ``maps=("ablation",)``). One full forward per conditioning records every site at once (forward hooks,
  :class:`interp.hooks.HookSet`), so a prompt costs ``1 + k`` U-Net calls per ``t`` rather than
  ``(1 + k)`` per site and seed — the tests check the maps against both probes and a direct computation;
* **location-free summaries** of each map (SDXL phrases have no location) — *ours*:
  ``pr_fraction`` (spatial participation ratio ``(ΣΔ)²/ΣΔ²`` over the number of positions: 1 for an
  effect spread evenly over the image, ``1/(h·w)`` for one position), ``support_90`` (the smallest fraction
  of positions holding 90 % of ``Δ``), ``hoyer`` (spatial Hoyer sparsity: 0 flat, 1 one position), and over
  channels (mass ``Σ_i |Δ_{c,i}|`` per channel) ``channel_support_90``, ``channel_pr_fraction``,
  ``channel_hoyer``; ``mass`` (``ΣΔ``) and ``relative`` (``‖h(c) − h(c∖j)‖ / ‖h(c)‖``, Frobenius). The
  shape measures are NaN (JSON ``null``) for a map that is identically zero: no effect has no shape;
* **concept cosines** (:func:`probes.concept_cosines`) at each site and at the output (``conv_out``, whose
  output is the prediction) for the concepts *each style alone*, *each content alone* and *the crosses*
  (each encoded as its own prompt), with a **block score** (*ours*): mean ``|cos|`` over pairs within a
  family (style–style, content–content) minus the mean over style–content pairs. Positive: the style and
  content directions form separate blocks, the necessary condition for feature-space composition.

Caveat (:func:`interp.models.sdxl.prompt_conditioning`): CLIP's text encoders are causal, so the content
tokens (after the style in ``"<style>, <content>"``) and the pooled embedding still carry the style after
``drop(style)``; an ablation measures the effect of the phrase's *own* tokens in cross-attention.

U-Net calls (:func:`count_calls`, what ``--plan`` reports): ``P · (1 + k) · T`` for the ablations
(``P`` prompts, ``k = 2`` phrases, ``T`` noise levels; each call a batch of ``S`` seeds) plus
``(n_sites + 1) · T · (n_concepts + 1)`` for the cosines (one forward per concept and the null, stopped
after the site).

Output folder (claimed with :func:`interp.io.prepare_output_dir`, kind ``features-sdxl``), resumable per prompt:

* ``settings.json`` — the fixed settings (model, weights hash, seeds, t, sites, dtype); a resume with others
  is refused, naming them (styles and contents may change: new prompts are added, finished ones kept);
* ``parts/<prompt>.json`` + ``.safetensors`` — one per finished prompt (rows; the output maps ``(T, k, H, W)``,
  mean over seeds), ``parts/cosines-<site>-<hash>.json`` — one per site and concept set, each atomic;
* ``results.json`` — ``settings``, ``rows`` (tidy: one row per ``model, prompt, phrase, kind, site, t, seed,
  metric``), ``summary`` (means over prompts and seeds per kind, site, t, metric), ``cosines``
  (site → t → concepts and matrix), ``cosine_rows`` (block scores per site and t), ``calls``, ``machine``,
  ``wall_s``; ``ablation_maps.png`` (phrases × t), ``cosines.png`` (sites × t), ``spread.png`` (spatial and
  channel support per site, style vs content).

Only random-weight tiny SDXL has been run here (no weights can be downloaded on this machine).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.clevr.evaluate import OptionError
from scorescope.experiments.study import check_json_option, claim_study_folder
from interp.io import atomic_write, atomic_write_json

KIND = "features-sdxl"
"""Marker kind of the output folder."""

STYLES: tuple[str, ...] = ("a watercolor painting", "an oil painting", "a pencil sketch")
CONTENTS: tuple[str, ...] = ("a cat", "a dog", "a horse", "a red hat")
SEP = ", "
DEFAULT_T: tuple[float, ...] = (0.2, 0.5, 0.8)
BLOCKS = "blocks"
"""The default ``sites``: every down block, the mid block and every up block output, in execution order."""

OUTPUT = "output"
"""Site name of the U-Net's own output (the latent-space prediction; ``conv_out`` for the cosines)."""

COLUMNS: tuple[str, ...] = ("model", "prompt", "style", "content", "phrase", "kind", "site", "t", "timestep", "seed",
                            "metric", "value")
"""Columns of ``rows``: one row per (prompt, phrase, site, t, seed, metric)."""

METRICS: tuple[str, ...] = ("mass", "relative", "pr_fraction", "support_90", "hoyer",
                            "channel_support_90", "channel_pr_fraction", "channel_hoyer")
COSINE_METRICS: tuple[str, ...] = ("within_style", "within_content", "within", "across", "block_score")

#: Fixed settings of a folder: a resume must match them.
FIXED = ("model", "config_hash", "seeds", "t", "sites", "sep", "dtype", "branch", "quantity")


# ------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """One crossed prompt: ``style`` then ``content``, joined by :data:`SEP`."""

    style: str
    content: str

    @property
    def phrases(self) -> tuple[str, str]:
        return (self.style, self.content)

    @property
    def text(self) -> str:
        return SEP.join(self.phrases)


KINDS = ("style", "content")
"""Phrase kind of conditioner ``j`` of every prompt: ``KINDS[j]``."""


def _phrases(values: Sequence[str], option: str) -> list[str]:
    out: list[str] = []
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise OptionError(f"{option} got an empty phrase ({v!r}): every phrase must hold a word; remove it", option)
        if SEP.strip() in v:
            raise OptionError(f"{option} phrase {v!r} contains {SEP.strip()!r}, the separator between phrases; "
                              "reword it", option)
        v = " ".join(v.split())
        if v not in out:
            out.append(v)
    return out


def prompt_set(styles: Sequence[str] = (), contents: Sequence[str] = (), *, builtin: bool = True) -> list[Prompt]:
    """The crossed prompts: (built-in +) user ``styles`` × (built-in +) user ``contents``, styles outer.

    Raises:
        OptionError: an empty phrase (``--style`` / ``--content``), or an empty prompt set (no style or no
            content once the built-ins are off).
    """
    s = _phrases([*(STYLES if builtin else ()), *styles], "--style")
    c = _phrases([*(CONTENTS if builtin else ()), *contents], "--content")
    for name, values in (("--style", s), ("--content", c)):
        if not values:
            raise OptionError(f"the prompt set is empty: no {name[2:]} phrase (built-ins are off); pass {name} "
                              "PHRASE, or leave out --no-builtin", name)
    return [Prompt(a, b) for a in s for b in c]


def concept_set(prompts: Sequence[Prompt]) -> dict[str, tuple[str, ...]]:
    """Concept name → its phrases: each style alone, each content alone, then each cross (in prompt order)."""
    styles = list(dict.fromkeys(p.style for p in prompts))
    contents = list(dict.fromkeys(p.content for p in prompts))
    out: dict[str, tuple[str, ...]] = {s: (s,) for s in styles}
    out.update({c: (c,) for c in contents})
    out.update({p.text: p.phrases for p in prompts})
    return out


def check_levels(t: Sequence[float]) -> list[float]:
    """Noise fractions in ``[0, 1]``, unique, in order; :class:`OptionError` naming ``--t`` otherwise."""
    out: list[float] = []
    for v in t:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise OptionError(f"--t takes noise fractions in [0, 1] (0 clean, 1 pure noise), got {v!r}", "--t")
        if float(v) not in out:
            out.append(float(v))
    if not out:
        raise OptionError("--t is empty: give noise fractions such as 0.2,0.5,0.8", "--t")
    return out


def check_seeds(seeds: int) -> list[int]:
    """``seeds`` samples: seeds ``0 … seeds − 1``."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise OptionError(f"--seeds is the number of forward-process samples (>= 1), got {seeds!r}", "--seeds")
    return list(range(seeds))


def resolve_sites(unet: torch.nn.Module, sites: str | Sequence[str]) -> list[str]:
    """Exact module paths of ``sites``: :data:`BLOCKS`, or comma-separated paths / globs (e.g. ``*attn2``).

    :data:`BLOCKS` gives ``down_blocks.0 …, mid_block, up_blocks.0 …`` (execution order). Raises
    :class:`OptionError` naming ``--sites`` for a site matching no module (with the closest real paths).
    """
    from interp.site import SiteError, resolve_paths

    patterns = [p.strip() for p in (sites.split(",") if isinstance(sites, str) else sites) if p.strip()]
    if not patterns:
        raise OptionError("--sites is empty: give 'blocks' or module paths / globs such as '*attn2'", "--sites")
    paths: list[str] = []
    for pattern in patterns:
        if pattern == BLOCKS:
            found = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
            found += ["mid_block"] if getattr(unet, "mid_block", None) is not None else []
            found += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        else:
            try:
                found = [p for p, _ in resolve_paths(unet, pattern)]
            except SiteError as err:
                raise OptionError(" ".join(str(err).split()), "--sites") from None
        paths += [p for p in found if p not in paths]
    if OUTPUT in paths:
        raise OptionError(f"{OUTPUT!r} is always measured; leave it out of --sites", "--sites")
    return paths


# --------------------------------------------------------------------------------------------- costs
def count_calls(n_prompts: int, n_concepts: int, n_sites: int, n_t: int, k: int = 2) -> dict[str, int]:
    """U-Net calls of a run (each a batch of all seeds): ablations, cosines and their total (module docstring)."""
    ablation = n_prompts * (1 + k) * n_t
    cosine = (n_sites + 1) * n_t * (n_concepts + 1)
    return {"ablation": ablation, "cosine": cosine, "total": ablation + cosine}


def plan_sdxl(
    *,
    styles: Sequence[str] = (),
    contents: Sequence[str] = (),
    builtin: bool = True,
    t: Sequence[float] = DEFAULT_T,
    seeds: int = 2,
    sites: str | Sequence[str] = BLOCKS,
    dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """U-Net calls and byte cost of the full-size run, on the meta-device SDXL U-Net (no weights, no memory).

    Byte sizes come from :func:`interp.capture.plan_capture` (a shape-only pass on fake tensors) at SDXL's
    128 × 128 latent, the batch being the seeds and activations held in ``dtype``. ``peak_bytes``: the
    activations one ablation holds at once (the full prompt's and one dropped prompt's, every site and the
    output); ``total_bytes``: everything the run reads out of the network.
    """
    from interp.capture import plan_capture
    from interp.models.sdxl import sdxl_unet_config, sdxl_unet_meta
    from interp.validation import format_bytes

    prompts = prompt_set(styles, contents, builtin=builtin)
    levels = check_levels(t)
    seed_list = check_seeds(seeds)
    unet = sdxl_unet_meta()
    paths = resolve_sites(unet, sites)
    size = sdxl_unet_config()["sample_size"]
    S = len(seed_list)
    plan = plan_capture(unet, [*paths, "conv_out"], sample_shape=(S, 4, size, size), store_dtype=dtype)
    per_site = {p: b for p, (_, _, b) in plan.per_call.items()}
    concepts = concept_set(prompts)
    calls = count_calls(len(prompts), len(concepts), len(paths), len(levels))
    per_call = plan.bytes_per_call  # every site plus the output (conv_out)
    cosine_bytes = sum(per_site.values()) * len(levels) * (len(concepts) + 1)
    total = per_call * calls["ablation"] + cosine_bytes
    return {
        "model": "SDXL-base 1.0 U-Net on the meta device (interp.models.sdxl.sdxl_unet_meta; no weights loaded)",
        "latent": [4, size, size], "batch": S, "dtype": str(dtype).removeprefix("torch."),
        "prompts": len(prompts), "phrases_per_prompt": 2, "concepts": len(concepts), "t": levels, "seeds": seed_list,
        "sites": paths,
        "calls": calls,
        "calls_formula": "ablation = prompts * (1 + phrases) * t; cosine = (sites + 1) * t * (concepts + 1)",
        "shapes": {p: list(s) for p, (s, _, _) in plan.per_call.items()},
        "bytes_per_site": per_site,
        "ablation_bytes_per_call": per_call,
        "peak_bytes": 2 * per_call,
        "total_bytes": total,
        "summary": (f"{calls['total']} U-Net calls (batch {S}: {calls['ablation']} ablation + {calls['cosine']} cosine), "
                    f"{format_bytes(2 * per_call)} of activations held at once, {format_bytes(total)} read in all"),
    }


# ------------------------------------------------------------------------------------------ loading
def load_pipeline(model: str, *, device: str, dtype: torch.dtype | None) -> tuple[Any, Any]:
    """``(pipeline, denoiser)`` of an SDXL model: a known name, a ``save_pretrained`` folder, or a hub id.

    Known names and folders go through :func:`interp.models.registry.load_model`; anything else is tried as a
    hub id with :func:`interp.models.sdxl.load_sdxl` (``from_pretrained``). ``dtype`` casts the pipeline
    (``None``: keep the loaded dtype). Raises :class:`OptionError` naming ``--model``.
    """
    from interp.models.registry import known_names, load_model
    from interp.models.sdxl import load_sdxl, sdxl_denoiser

    path = Path(model)
    if model in known_names() or path.is_dir():
        try:
            loaded = load_model(model, device=device)
        except (ValueError, OSError) as err:
            raise OptionError(f"--model {model!r} is not an SDXL pipeline: {' '.join(str(err).split())}", "--model") from None
        if loaded.family != "sdxl":
            raise OptionError(f"--model {model!r} is a {loaded.family} model, not an SDXL pipeline; pass an SDXL folder "
                              "saved with save_pretrained, a hub id, or tiny-sdxl", "--model")
        pipe = loaded.pipeline
        name = loaded.name
    else:
        try:
            pipe = load_sdxl(model, device=device, dtype=dtype or torch.float32)
        except OSError as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise OptionError(f"--model {model!r} is not a known name ({', '.join(known_names())}) nor a folder, and "
                              f"loading it as a hub id failed ({first[:200]}); pass a folder saved with save_pretrained "
                              "or a hub id with network access", "--model") from None
        name = model
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    return pipe, sdxl_denoiser(pipe, name=name)


def default_dtype(model: str, device: str) -> torch.dtype | None:
    """float16 for a hub id on CUDA (the hub's SDXL weights are run in half precision); else ``None``: keep the
    loaded dtype (a folder's saved dtype, float32 for ``tiny-sdxl`` and for a hub id on CPU)."""
    from interp.models.registry import known_names

    if device.startswith("cuda") and model not in known_names() and not Path(model).is_dir():
        return torch.float16
    return None


# -------------------------------------------------------------------------------------------- compute
def forward_with_sites(den: Any, paths: Sequence[str], cond: Any, x_t: Tensor, timestep: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """One conditional-branch forward: the prediction ``(S, C, H, W)`` and every site's activation ``(S, C_L, h, w)``.

    Hooks are installed with :class:`interp.hooks.HookSet` and removed on every exit path; token activations
    ``(S, N, C)`` are viewed spatially with :func:`interp.site.spatial_view`.
    """
    from interp.evaluate import evaluate
    from interp.hooks import HookSet, primary_tensor
    from interp.site import resolve_paths, spatial_view

    box: dict[str, Tensor] = {}

    def hook_for(path: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
            box[path] = primary_tensor(out).detach()

        return hook

    with HookSet() as hooks, torch.no_grad():
        for path in paths:
            hooks.forward(resolve_paths(den.unet, path)[0][1], hook_for(path))
        out = evaluate(den, x_t, timestep, cond, branch="cond")
    missing = [p for p in paths if p not in box]
    if missing:
        raise RuntimeError(f"sites {missing} did not run in the forward pass")
    return out.detach(), {p: spatial_view(box[p], tuple(x_t.shape[-2:])) for p in paths}


def map_metrics(diff: Tensor, full: Tensor) -> list[dict[str, float]]:
    """Per-sample summaries (:data:`METRICS`) of a difference ``diff = h(c) − h(c∖j)`` ``(S, C, h, w)``.

    ``full`` is ``h(c)`` (for ``relative``). Shape measures are NaN for an all-zero map.
    """
    from probes.summaries import channel_sparsity, hoyer_sparsity, participation_ratio, support_fraction

    diff = diff.detach().to("cpu", torch.float64)
    full = full.detach().to("cpu", torch.float64)
    spatial = diff.pow(2).sum(1).sqrt()  # (S, h, w): Δ(i) = ‖h_i(c) − h_i(c∖j)‖ over channels
    n_pos, n_ch = spatial[0].numel(), diff.shape[1]
    pr = participation_ratio(spatial)
    channels = channel_sparsity(diff.abs(), 0.9)  # over each channel's mass Σ_i |Δ_{c,i}|; (S,) each
    out = []
    for s in range(diff.shape[0]):
        mass = float(spatial[s].sum())
        row = {"mass": mass, "relative": float(diff[s].norm() / full[s].norm().clamp_min(1e-300))}
        if mass > 0:
            row.update(pr_fraction=float(pr[s]) / n_pos, support_90=float(support_fraction(spatial[s], 0.9)),
                       hoyer=float(hoyer_sparsity(spatial[s])),
                       channel_support_90=float(channels["channel_support"][s]),
                       channel_pr_fraction=float(channels["channel_pr"][s]) / n_ch,
                       channel_hoyer=float(channels["channel_hoyer"][s]))
        else:
            row.update({m: float("nan") for m in METRICS[2:]})
        out.append(row)
    return out


def ablate_prompt(
    den: Any, pipe: Any, prompt: Prompt, paths: Sequence[str], inputs: Sequence[tuple[float, Tensor, Tensor]],
    seeds: Sequence[int], model: str,
) -> tuple[list[dict[str, Any]], Tensor]:
    """Rows (:data:`COLUMNS`) and the output ablation maps ``(T, k, H, W)`` (mean over seeds) of one prompt.

    ``inputs``: ``[(t, x_t (S, C, H, W), timestep), ...]``, one sample per seed.
    """
    from interp.evaluate import accumulation_dtype
    from interp.models.sdxl import prompt_conditioning

    cond = prompt_conditioning(pipe, list(prompt.phrases), sep=SEP).to(den.device)
    rows: list[dict[str, Any]] = []
    maps = []
    for level, x_t, ts in inputs:
        acc = accumulation_dtype(x_t)
        full_out, full_acts = forward_with_sites(den, paths, cond, x_t, ts)
        per_phrase = []
        for j, phrase in enumerate(prompt.phrases):
            out_j, acts_j = forward_with_sites(den, paths, cond.drop(j), x_t, ts)
            pairs = [(OUTPUT, full_out.to(acc), out_j.to(acc))] + [(p, full_acts[p].to(acc), acts_j[p].to(acc)) for p in paths]
            for site, a, b in pairs:
                for s, metrics in zip(seeds, map_metrics(a - b, a)):
                    base = dict(model=model, prompt=prompt.text, style=prompt.style, content=prompt.content, phrase=phrase,
                                kind=KINDS[j], site=site, t=level, timestep=int(ts), seed=int(s))
                    rows += [dict(base, metric=m, value=metrics[m]) for m in METRICS]
            per_phrase.append((full_out.to(acc) - out_j.to(acc)).pow(2).sum(1).sqrt().mean(0).float().cpu())
        maps.append(torch.stack(per_phrase))
    return rows, torch.stack(maps)


def block_scores(cos: Tensor, names: Sequence[str], styles: Sequence[str], contents: Sequence[str]) -> dict[str, float]:
    """Mean ``|cos|`` within the style family, within contents, within both, across (style × content), and
    ``block_score = within − across`` (NaN where a family has a single member: no within-family pair)."""
    idx = {n: i for i, n in enumerate(names)}
    a = cos.abs().double()

    def mean(pairs: list[tuple[str, str]]) -> float:
        return float(torch.stack([a[idx[x], idx[y]] for x, y in pairs]).mean()) if pairs else float("nan")

    ss = [(x, y) for i, x in enumerate(styles) for y in styles[i + 1:]]
    cc = [(x, y) for i, x in enumerate(contents) for y in contents[i + 1:]]
    sc = [(x, y) for x in styles for y in contents]
    within, across = mean(ss + cc), mean(sc)
    return {"within_style": mean(ss), "within_content": mean(cc), "within": within, "across": across,
            "block_score": within - across}


# ------------------------------------------------------------------------------------------------ run
@dataclass
class SdxlResult:
    """What :func:`run_sdxl_features` did: the tidy frames, the maps, the files, the calls, the wall time."""

    frame: Any
    cosine_frame: Any
    cosines: dict[str, dict[str, dict[str, Any]]]
    maps: dict[str, Tensor]
    settings: dict[str, Any]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


def _stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def _none(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def _nan(v: Any) -> Any:
    return float("nan") if v is None else v


def machine(device: str) -> dict[str, Any]:
    """Where the run ran (shared with the locality sweep)."""
    from scorescope.experiments.locality_sweep import machine as _machine

    return dict(_machine(), device=device)


def run_sdxl_features(
    model: str,
    *,
    out: str | Path,
    styles: Sequence[str] = (),
    contents: Sequence[str] = (),
    builtin: bool = True,
    t: Sequence[float] = DEFAULT_T,
    seeds: int = 2,
    sites: str | Sequence[str] = BLOCKS,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    json_path: str | Path | None = None,
    overwrite: bool = False,
    figures: bool = True,
    progress: Callable[[str], None] | None = None,
) -> SdxlResult:
    """Run (or resume) the SDXL style + content study; see the module docstring for what it computes and writes.

    Args:
        model: ``tiny-sdxl``, a folder saved with ``save_pretrained``, or a hub id (:func:`load_pipeline`).
        out: the output folder. styles / contents: phrases added to (or, without ``builtin``, replacing) the
            built-in :data:`STYLES` / :data:`CONTENTS`. t: noise fractions in ``[0, 1]``. seeds: samples per t
            (seeds ``0 … seeds − 1``). sites: :data:`BLOCKS` or module paths / globs (:func:`resolve_sites`).
        device: default CUDA when present. dtype: cast the pipeline (default: float16 on CUDA for a hub id,
            else the loaded dtype). json_path: also write ``results.json``'s content there.
        overwrite: claim a non-empty folder that is not this command's (nothing in it is deleted).
        figures: write the three figures. progress: called with one line per finished unit.

    Raises:
        OptionError: a bad option (``option`` names it): an empty prompt set or phrase, ``t`` outside
            ``[0, 1]``, an unknown site, a model that is not an SDXL pipeline, an unwritable ``--json``, or
            an ``out`` holding a run with other fixed settings.
        FileExistsError: ``out`` is a foreign non-empty folder and ``overwrite`` is off.
    """
    import pandas as pd
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from interp.inputs import forward_samples, input_shape
    from probes.features import concept_cosines

    t0 = time.perf_counter()
    prompts = prompt_set(styles, contents, builtin=builtin)
    levels = check_levels(t)
    seed_list = check_seeds(seeds)
    check_json_option(json_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype if dtype is not None else default_dtype(model, device)
    pipe, den = load_pipeline(model, device=device, dtype=dtype)
    paths = resolve_sites(pipe.unet, sites)
    concepts = concept_set(prompts)
    style_names = list(dict.fromkeys(p.style for p in prompts))
    content_names = list(dict.fromkeys(p.content for p in prompts))
    settings = {
        "model": str(model), "config_hash": den.metadata()["config_hash"], "seeds": seed_list, "t": levels,
        "sites": paths, "sep": SEP, "dtype": str(den.dtype).removeprefix("torch."), "branch": "cond",
        "quantity": "prediction", "prediction_type": den.metadata().get("prediction_type"),
        "random_weights": str(model) == "tiny-sdxl", "styles": style_names, "contents": content_names,
        "prompts": [p.text for p in prompts], "concepts": list(concepts), "latent": list(input_shape(den)),
    }
    settings = json.loads(json.dumps(settings))
    out, parts = claim_study_folder(out, KIND, settings, FIXED, settings_file="settings.json", may_change="--style, --content and --builtin",
                                    overwrite=overwrite)

    inputs = [(level, *forward_samples(den, level, seed_list)) for level in levels]
    result = SdxlResult(frame=None, cosine_frame=None, cosines={}, maps={}, settings=settings)
    rows: list[dict[str, Any]] = []
    for prompt in prompts:
        stem = parts / _stem(prompt.text)
        part, tensors = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
        if part.exists():
            data = json.loads(part.read_text())
            if data["prompt"] != prompt.text:
                raise ValueError(f"{part} holds the prompt {data['prompt']!r}, not {prompt.text!r}")
            rows += [{c: _nan(r[c]) if c == "value" else r[c] for c in COLUMNS} for r in data["rows"]]
            result.maps[prompt.text] = st_load(tensors.read_bytes())["ablation"]
            result.skipped.append(prompt.text)
            continue
        u0 = time.perf_counter()
        prows, maps = ablate_prompt(den, pipe, prompt, paths, inputs, seed_list, str(model))
        atomic_write(tensors, st_save({"ablation": maps.contiguous()}))  # before the JSON: the JSON marks it done
        atomic_write_json(part, {"prompt": prompt.text, "rows": [{k: _none(v) for k, v in r.items()} for r in prows],
                                 "wall_s": round(time.perf_counter() - u0, 3)}, indent=None)
        rows += prows
        result.maps[prompt.text] = maps
        result.ran.append(prompt.text)
        result.calls["ablation"] = result.calls.get("ablation", 0) + (1 + len(prompt.phrases)) * len(levels)
        if progress:
            progress(f"done {prompt.text!r} ({time.perf_counter() - u0:.1f} s)")

    # Concept cosines: one part per site and concept set (the set changes when the prompts do).
    conds = None
    key = hashlib.sha1(json.dumps(list(concepts)).encode()).hexdigest()[:8]
    cos_rows: list[dict[str, Any]] = []
    for site, path in [(OUTPUT, "conv_out"), *[(p, p) for p in paths]]:
        part = parts / f"cosines-{_stem(site)}-{key}.json"
        if part.exists():
            per_t = json.loads(part.read_text())["per_t"]
            result.skipped.append(f"cosines {site}")
        else:
            if conds is None:
                from interp.models.sdxl import prompt_conditioning

                conds = {n: prompt_conditioning(pipe, list(ph), sep=SEP) for n, ph in concepts.items()}
            per_t = {}
            for level in levels:
                res = concept_cosines(den, path, conds, level, seed_list)
                cos = res.maps["cosine"]
                per_t[f"{level:g}"] = {"t": level, "timestep": res.metadata["timestep"], "concepts": list(concepts),
                                       "matrix": cos.tolist(), "norms": res.maps["norms"].tolist(),
                                       "blocks": {k: _none(v) for k, v in block_scores(cos, list(concepts), style_names, content_names).items()}}
            atomic_write_json(part, {"site": site, "path": path, "per_t": per_t}, indent=None)
            result.calls["cosine"] = result.calls.get("cosine", 0) + len(levels) * (len(concepts) + 1)
            result.ran.append(f"cosines {site}")
            if progress:
                progress(f"done cosines at {site}")
        result.cosines[site] = per_t
        for entry in per_t.values():
            cos_rows += [dict(model=str(model), site=site, t=entry["t"], timestep=entry["timestep"], n_seeds=len(seed_list),
                              metric=m, value=_nan(entry["blocks"][m])) for m in COSINE_METRICS]
    result.calls["total"] = result.calls.get("ablation", 0) + result.calls.get("cosine", 0)

    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    result.frame = frame
    result.cosine_frame = pd.DataFrame(cos_rows)
    summary = (frame.groupby(["kind", "site", "t", "metric"], sort=False)["value"].agg(["mean", "std", "count"])
               .reset_index())
    if figures:
        result.paths["ablation_maps"] = ablation_figure(result.maps, prompts, levels, out / "ablation_maps.png")
        result.paths["cosines"] = cosine_figure(result.cosines, out / "cosines.png")
        result.paths["spread"] = spread_figure(frame, [OUTPUT, *paths], out / "spread.png")
    result.wall_s = time.perf_counter() - t0
    record = {
        "settings": settings,
        "rows": [{k: _none(v) for k, v in r.items()} for r in frame.to_dict("records")],
        "summary": [{k: _none(v) for k, v in r.items()} for r in summary.to_dict("records")],
        "cosines": result.cosines,
        "cosine_rows": [{k: _none(v) for k, v in r.items()} for r in result.cosine_frame.to_dict("records")],
        "calls": result.calls,
        "planned_calls": count_calls(len(prompts), len(concepts), len(paths), len(levels)),
        "units": {"ran": len(result.ran), "skipped": len(result.skipped)},
        "machine": machine(device),
        "wall_s": round(result.wall_s, 2),
        "note": ("random-weight tiny SDXL: these numbers test the code path and say nothing about SDXL"
                 if settings["random_weights"] else "weights: " + str(model)),
    }
    result.paths["json"] = atomic_write_json(out / "results.json", record)
    if json_path is not None:
        result.paths["extra_json"] = atomic_write_json(json_path, record)
    return result


# ---------------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ablation_figure(maps: dict[str, Tensor], prompts: Sequence[Prompt], levels: Sequence[float], path: Path) -> Path:
    """Output ablation maps, rows = phrases (mean over the prompts holding the phrase and the seeds), cols = t."""
    from interp.clevr.evaluate import save_figure

    plt = _plt()
    phrases: dict[str, list[Tensor]] = {}
    for p in prompts:
        for j, phrase in enumerate(p.phrases):
            phrases.setdefault(f"{KINDS[j]}: {phrase}", []).append(maps[p.text][:, j])
    names = sorted(phrases, key=lambda n: not n.startswith("style"))  # styles first, then contents (stable)
    fig, axes = plt.subplots(len(names), len(levels), figsize=(1.9 * len(levels) + 1.2, 1.7 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        m = torch.stack(phrases[name]).mean(0)  # (T, H, W)
        for c, level in enumerate(levels):
            ax = axes[r][c]
            ax.imshow(m[c].numpy(), cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t = {level:g}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle("latent Δ_j = ‖D(c) − D(c∖j)‖\n(each map its own scale)", fontsize=8)
    return save_figure(fig, path)


def cosine_figure(cosines: dict[str, dict[str, dict[str, Any]]], path: Path) -> Path:
    """Concept cosine heatmaps, rows = sites, cols = t (styles, contents, then crosses)."""
    import numpy as np

    plt = _plt()
    sites = list(cosines)
    keys = list(next(iter(cosines.values())))
    n = len(next(iter(next(iter(cosines.values())).values()))["concepts"])
    side = 1.2 + 0.16 * n
    fig, axes = plt.subplots(len(sites), len(keys), figsize=(side * len(keys), side * len(sites)), squeeze=False)
    for r, site in enumerate(sites):
        for c, key in enumerate(keys):
            entry = cosines[site][key]
            ax = axes[r][c]
            im = ax.imshow(np.asarray(entry["matrix"]), vmin=-1, vmax=1, cmap="RdBu_r")
            score = entry["blocks"]["block_score"]
            ax.set_title(f"{site}, t={entry['t']:g}\nblock {score:+.2f}" if score is not None else f"{site}, t={entry['t']:g}",
                         fontsize=7)
            labels = entry["concepts"] if c == 0 else [""] * n
            ax.set_yticks(range(n), labels, fontsize=4)
            ax.set_xticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    return _save_tight_bbox(fig, path)


def _save_tight_bbox(fig: Any, path: Path) -> Path:
    """Save atomically with ``bbox_inches="tight"`` (``tight_layout`` cannot place a colorbar shared by a grid)."""
    buf = io.BytesIO()
    plt = _plt()
    try:
        fig.savefig(buf, dpi=120, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def spread_figure(frame: Any, order: Sequence[str], path: Path) -> Path:
    """Spatial and channel support (fraction holding 90 % of Δ) per site, style vs content (mean ± sd)."""
    import seaborn as sns

    from interp.clevr.evaluate import save_figure

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(2.4 + 0.6 * len(order), 3.2), sharey=True)
    for ax, metric in zip(axes, ("support_90", "channel_support_90")):
        df = frame[frame["metric"] == metric].dropna(subset=["value"])
        if len(df):
            sns.pointplot(data=df, x="site", y="value", hue="kind", order=list(order), errorbar="sd", dodge=0.3, ax=ax)
        ax.set_title(f"{metric}\n({'positions' if metric == 'support_90' else 'channels'} with 90 % of Δ)",
                     fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("")
        ax.set_ylabel("share")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    return save_figure(fig, path)


__all__ = [
    "BLOCKS", "COLUMNS", "CONTENTS", "COSINE_METRICS", "DEFAULT_T", "FIXED", "KIND", "KINDS", "METRICS", "OUTPUT",
    "Prompt", "SdxlResult", "STYLES", "ablate_prompt", "ablation_figure", "block_scores", "check_levels", "check_seeds",
    "concept_set", "cosine_figure", "count_calls", "forward_with_sites", "load_pipeline", "map_metrics", "plan_sdxl",
    "prompt_set", "resolve_sites", "default_dtype", "run_sdxl_features", "spread_figure",
]
