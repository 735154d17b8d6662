"""``scorescope export``: paper-ready figures of a probe's maps, with their raw arrays and provenance.

    scorescope export maps --model exp1 --probe pixel --t 0.5,0.9 --pixels 'center' --format pdf,svg,png --out fig/
    scorescope export maps --model exp1 --probe conditional --maps jvp --t 0.1,0.5,0.9 --norm shared \\
        --width two-column --out fig/

Runs the probe (:func:`probes.pixel_locality` / :func:`probes.conditional_locality`) on the model
(:func:`interp.models.registry.load_model`) and exports its maps with :func:`scorescope.export.export_maps`. Every
option is checked before the model loads; a bad one is one usage error (exit 2) naming the option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(help="Export paper-ready figures (PDF, SVG, PNG) of probe maps, with raw arrays and metadata.\n\n"
                  "Example: scorescope export maps --model exp1 --probe pixel --t 0.5,0.9 --out fig/",
                  no_args_is_help=True, add_completion=False)

@app.callback()
def _group() -> None:
    """Export paper-ready figures (PDF, SVG, PNG) of probe maps, with raw arrays and metadata."""


PROBES = ("pixel", "conditional")
#: Maps each probe can export (conditional: the probe computes the ones requested).
PROBE_MAPS = {"pixel": ("G",),
              "conditional": ("jvp", "ablation", "attribution", "n_eff_jvp", "n_eff_ablation", "n_eff_attribution")}
DEFAULT_MAPS = {"pixel": "G", "conditional": "jvp"}


def _bad(message: str, option: str) -> typer.BadParameter:
    return typer.BadParameter(message, param_hint=f"'{option}'")


def parse_pixels(text: str) -> Any:
    """``"all"`` / ``"center"`` / a grid stride ``"8"`` / pairs ``"16,16;4,20"`` → a ``pixels=`` spec."""
    text = text.strip()
    if text in ("all", "center"):
        return text
    if text.isdigit():
        return int(text)
    try:
        pairs = [tuple(int(v) for v in p.split(",")) for p in text.split(";") if p.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"pixels must be 'all', 'center', a grid stride (int) or 'row,col;row,col', got {text!r}")
    return pairs


def parse_levels(text: str) -> list[float]:
    """``"0.5,0.9"`` → ``[0.5, 0.9]``, each in [0, 1]."""
    try:
        levels = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated noise fractions in [0, 1], got {text!r}") from None
    bad = [v for v in levels if not 0.0 <= v <= 1.0]
    if not levels or bad:
        raise ValueError(f"noise fractions must be in [0, 1] (t = 0 clean, 1 pure noise), got {text!r}")
    return levels


@app.command("maps")
def maps_command(
    model: str = typer.Option(..., "--model", help="Model name (tiny-clevr, tiny-sdxl, exp1..3, colour) or a saved folder."),
    probe: str = typer.Option(..., "--probe", help="Which probe: 'pixel' (Jacobian maps G) or 'conditional' (conditioner maps)."),
    out: Path = typer.Option(..., "--out", help="Output folder (claimed; a foreign non-empty folder needs --overwrite)."),
    t: str = typer.Option("0.5", "--t", help="Noise fractions in [0, 1], comma-separated (the grid's columns)."),
    formats: str = typer.Option("pdf,svg,png", "--format", help="Figure formats, comma-separated: pdf, svg, png."),
    maps: Optional[str] = typer.Option(None, "--maps", help="Maps to export, comma-separated (default: G for pixel, jvp for conditional; conditional also ablation, attribution, n_eff_<map>)."),
    pixels: str = typer.Option("center", "--pixels", help="Pixel probe: output pixels 'all', 'center', a grid stride, or 'row,col;row,col'."),
    locations: Optional[str] = typer.Option(None, "--locations", help="CLEVR conditioner locations 'x,y;x,y' (normalised); default: three objects."),
    directions: str = typer.Option("all", "--directions", help="Conditional probe, jvp map: 'all' coordinate directions (exact) or a number of random ones (an unbiased estimate, faster)."),
    seeds: int = typer.Option(2, "--seeds", help="Forward-process samples (seeds 0..n-1, >= 1) each map averages."),
    norm: str = typer.Option("auto", "--norm", help="Colour normalisation: auto, panel, shared, symmetric (signed maps), log (Jacobians)."),
    width: str = typer.Option("one-column", "--width", help="Figure width: one-column (3.25 in) or two-column (6.75 in)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a foreign non-empty folder (its files are kept; same-named files this command did not write are still refused)."),
) -> None:
    """Run a probe on a model and export its maps as figures + safetensors + JSON sidecars.

    Example: scorescope export maps --model exp1 --probe pixel --t 0.5,0.9 --format pdf,png --out fig/
    """
    from interp import figures
    from scorescope.export import check_formats

    if probe not in PROBES:
        raise _bad(f"unknown probe {probe!r}; use one of {', '.join(PROBES)}", "--probe")
    try:
        fmts = check_formats(formats.split(","))
    except ValueError as err:
        raise _bad(str(err), "--format") from None
    try:
        levels = parse_levels(t)
    except ValueError as err:
        raise _bad(str(err), "--t") from None
    names = [m.strip() for m in (maps or DEFAULT_MAPS[probe]).split(",") if m.strip()]
    unknown = [m for m in names if m not in PROBE_MAPS[probe]]
    if unknown or not names:
        raise _bad(f"the {probe} probe has no map(s) {unknown or names}; maps: {', '.join(PROBE_MAPS[probe])}", "--maps")
    try:
        spec = parse_pixels(pixels)
    except ValueError as err:
        raise _bad(str(err), "--pixels") from None
    if seeds < 1:
        raise _bad(f"seeds must be >= 1, got {seeds}", "--seeds")
    if directions != "all" and not (directions.isdigit() and int(directions) >= 1):
        raise _bad(f"directions must be 'all' or a whole number >= 1, got {directions!r}", "--directions")
    if norm not in figures.NORMS:
        raise _bad(f"norm must be one of {', '.join(figures.NORMS)}, got {norm!r}", "--norm")
    if width not in figures.WIDTHS:
        raise _bad(f"width must be one of {', '.join(figures.WIDTHS)}, got {width!r}", "--width")
    locs = None
    if locations:
        from probes.sweep import parse_locations

        try:
            locs = parse_locations(locations)
        except ValueError as err:
            raise _bad(str(err), "--locations") from None
    if out.exists() and not out.is_dir():
        raise _bad(f"{out} exists and is not a folder; pass a folder path", "--out")

    import os

    import torch

    import probes
    from interp.models.registry import load_model
    from scorescope.export import export_maps

    device = os.environ.get("SCORESCOPE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        loaded = load_model(model, device=device)
    except (ValueError, FileNotFoundError) as err:
        raise _bad(str(err), "--model") from None
    cond = loaded.conditioning(locs)
    try:
        if probe == "pixel":
            result = probes.pixel_locality(loaded.denoiser, cond, levels, seeds, pixels=spec)
        else:
            computed = tuple(dict.fromkeys(m.removeprefix("n_eff_") for m in names))
            result = probes.conditional_locality(loaded.denoiser, cond, levels, seeds, maps=computed,  # type: ignore[arg-type]
                                                 directions=directions if directions == "all" else int(directions),
                                                 radius=0.2 if cond.locations is not None else None)
    except ValueError as err:  # e.g. a pixel outside the image
        raise _bad(str(err), "--pixels" if probe == "pixel" else "--locations") from None
    try:
        done = export_maps(result, out, maps=names, formats=fmts, norm=norm, width=width, overwrite=overwrite)
    except FileExistsError as err:
        raise _bad(str(err), "--out") from None
    except ValueError as err:
        raise _bad(str(err), "--norm") from None
    for name, paths in done.paths.items():
        typer.echo(f"{name}: " + ", ".join(str(p) for p in paths))
