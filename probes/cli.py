"""``scorescope locality ...``: the probes from the command line.

* ``scorescope locality sweep --model exp1 --sites '*attn2' --t 0.1,0.5,0.9 --out DIR`` — a resumable sweep
  (:func:`probes.locality_sweep`); re-running the same command after an interruption finishes it. Under
  ``torchrun --nproc_per_node=N scorescope locality sweep ...`` the units are split across N processes
  (:mod:`interp.distributed`) and rank 0 writes the same ``results.csv`` as one process.
* ``scorescope locality pixel|cond|cpc --model NAME --t 0.5 --json FILE`` — one probe, its summaries
  printed as a table and the full result (maps included) written as JSON.

Models load on the GPU when one is present (override with ``SCORESCOPE_DEVICE=cpu``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer

T = TypeVar("T")

app = typer.Typer(help="Locality probes: pixel Jacobians, conditional maps, CPC residuals, layer sweeps.\n\n"
                  "Example: scorescope locality cond --model exp1 --t 0.5,0.9 --json cond.json", no_args_is_help=True)

MODEL = typer.Option("tiny-clevr", "--model", help="Model name (tiny-clevr, tiny-sdxl, exp1..3, colour) or a saved folder.")
LEVELS = typer.Option("0.5", "--t", help="Noise fractions in [0, 1], comma-separated.")
SEEDS = typer.Option(2, "--seeds", help="Number of forward-process samples (seeds 0..n-1).")
LOCS = typer.Option(None, "--locations", help="CLEVR conditioner locations 'x,y;x,y' (normalised); default: three objects.")
PROMPT = typer.Option(None, "--prompt", help="Phrases of a text-conditioned model (SD1.5/2, SDXL, PixArt, SD3, Flux), separated by '|' (default 'a red cube|a blue sphere'); a DiT class name or id.")


def _checked(option: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, with a ``ValueError`` turned into the usage error of ``option`` (one line, exit 2)."""
    try:
        return fn(*args)
    except ValueError as err:
        raise typer.BadParameter(" ".join(str(err).split()), param_hint=f"'{option}'") from None


def _levels(t: str) -> list[float]:
    from probes.sweep import parse_floats

    return _checked("--t", parse_floats, t)


def _load(model: str, locations: Optional[str], prompt: Optional[str]):
    import os

    from interp.distributed import rank_device
    from probes.sweep import _resolve, parse_locations

    locs = _checked("--locations", parse_locations, locations) if locations else None
    phrases = prompt.split("|") if prompt else None
    device = rank_device(os.environ.get("SCORESCOPE_DEVICE") or None)  # under torchrun: cuda:LOCAL_RANK
    return _checked("--model", lambda: _resolve(model, None, locs, phrases, device=device))


def _emit(result, json_path: Optional[Path], maps: bool) -> None:
    import pandas as pd

    df = result.frame()
    with pd.option_context("display.max_rows", 40, "display.width", 160):
        cols = [c for c in ("t", "metric", "value", "seed", "conditioner", "pixel_row", "pixel_col", "map_name") if c in df.columns]
        typer.echo(df[cols].to_string(index=False))
    if json_path is not None:
        result.save_json(json_path, include_maps=maps)
        typer.echo(f"wrote {json_path}")


@app.command()
def sweep(
    model: str = MODEL,
    sites: str = typer.Option("output", "--sites", help="'output' and/or module paths / globs, comma-separated (e.g. '*attn2')."),
    t: str = typer.Option("0.1,0.5,0.9", "--t", help="Noise fractions, comma-separated."),
    seeds: int = SEEDS,
    out: Path = typer.Option(..., "--out", help="Folder for part-files and results.csv (resumable)."),
    metrics: str = typer.Option("cond,cpc", "--metrics", help="Subset of cond,cpc,pixel."),
    radius: float = typer.Option(0.2, "--radius", help="Region radius (normalised units)."),
    directions: str = typer.Option("8", "--directions", help="JVP directions per conditioner, or 'all'."),
    branches: str = typer.Option("cond", "--branches", help="CFG branches of the output probes: cond,guided."),
    locations: Optional[str] = LOCS,
    prompt: Optional[str] = PROMPT,
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty folder that holds no sweep (nothing in it is deleted)."),
) -> None:
    """Sites x noise levels x seeds -> one tidy CSV; interrupted sweeps resume without duplicates.

    Example: scorescope locality sweep --model exp1 --sites '*attn2' --t 0.1,0.5,0.9 --out runs/sweep
    """
    from interp.distributed import RankAborted
    from probes.sweep import locality_sweep

    den, name, cond = _load(model, locations, prompt)
    try:
        df = locality_sweep(den, cond, sites=sites, t=_levels(t), seeds=seeds, out=out,
                            metrics=[m for m in metrics.split(",") if m], radius=radius,
                            directions=directions if directions == "all" else int(directions),
                            branches=[b for b in branches.split(",") if b], progress=typer.echo, overwrite=overwrite)
    except FileExistsError as err:
        raise typer.BadParameter(str(err), param_hint="--out") from None
    except RankAborted:
        raise typer.Exit(1) from None  # rank 0 reports the reason
    df["model"] = name
    from interp.distributed import detect_env

    if detect_env().is_main:  # one summary line, from the rank that wrote results.csv
        typer.echo(f"{len(df)} rows -> {out / 'results.csv'}")


@app.command()
def pixel(
    model: str = MODEL,
    t: str = LEVELS,
    seeds: int = SEEDS,
    pixels: str = typer.Option("center", "--pixels", help="'all', 'center', a grid stride (int), or 'r,c;r,c'."),
    method: str = typer.Option("dense", "--method", help="dense | compressed"),
    radius_px: Optional[int] = typer.Option(None, "--radius-px", help="Receptive-field radius in pixels (Chebyshev) for --method compressed."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result here."),
    include_maps: bool = typer.Option(True, "--maps/--no-maps", help="Include the G maps in the JSON (large for --pixels all)."),
    locations: Optional[str] = LOCS,
    prompt: Optional[str] = PROMPT,
) -> None:
    """Pixel-locality maps G(i, j) and their mass summaries.

    Example: scorescope locality pixel --model exp1 --t 0.1,0.9 --pixels center --json pixel.json
    """
    from probes.jacobian import pixel_locality

    den, _, cond = _load(model, locations, prompt)
    spec: object = pixels
    if pixels.isdigit():
        spec = int(pixels)
    elif ";" in pixels or "," in pixels:
        spec = [tuple(int(v) for v in p.split(",")) for p in pixels.split(";") if p]
    res = pixel_locality(den, cond, _levels(t), seeds, pixels=spec, method=method, radius_px=radius_px)  # type: ignore[arg-type]
    _emit(res, json_path, maps=include_maps)


@app.command()
def cond(
    model: str = MODEL,
    t: str = LEVELS,
    seeds: int = SEEDS,
    maps: str = typer.Option("jvp,ablation", "--maps", help="Subset of jvp,ablation,attribution."),
    directions: str = typer.Option("all", "--directions", help="'all' (exact) or a number of random directions."),
    radius: float = typer.Option(0.2, "--radius", help="Region radius (normalised units)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result (maps included) here."),
    locations: Optional[str] = LOCS,
    prompt: Optional[str] = PROMPT,
) -> None:
    """Conditional-locality maps (JVP, ablation) and in-region / leakage / n_eff summaries.

    Example: scorescope locality cond --model exp1 --t 0.5,0.9 --locations '0.3,0.3;0.7,0.7' --json cond.json
    """
    from probes.conditional import conditional_locality

    den, _, c = _load(model, locations, prompt)
    res = conditional_locality(den, c, _levels(t), seeds, maps=tuple(m for m in maps.split(",") if m),  # type: ignore[arg-type]
                               directions=directions if directions == "all" else int(directions),
                               radius=radius if c.locations is not None else None)
    _emit(res, json_path, maps=True)


@app.command()
def cpc(
    model: str = MODEL,
    t: str = typer.Option("0.1,0.5,0.9", "--t", help="Noise fractions, comma-separated."),
    seeds: int = SEEDS,
    radius: float = typer.Option(0.2, "--radius", help="Mask radius (normalised units)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result (maps included) here."),
    locations: Optional[str] = LOCS,
) -> None:
    """CPC residual per noise level (CLEVR-style located conditioners).

    Example: scorescope locality cpc --model exp2 --t 0.1,0.5,0.9 --json cpc.json
    """
    from probes.cpc import cpc_residual

    den, _, c = _load(model, locations, None)
    res = cpc_residual(den, c, _levels(t), seeds, radius=radius)
    _emit(res, json_path, maps=True)
