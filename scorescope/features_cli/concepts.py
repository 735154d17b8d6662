"""``scorescope features concepts``: colour-concept geometry against composition on a colour-conditioned model.

    scorescope features concepts --model colour --out runs/concepts --json concepts.json
    scorescope features concepts --model colour --out runs/concepts --colours red,blue,yellow --t 0.5 --n 16
    scorescope features concepts --model colour --out runs/concepts --sites 'mid_block,up_blocks.*,pixel'

For every site and noise level t: the cosine matrix of the colour concepts' difference vectors
``d_i = μ_i − μ_∅`` (averaged over seeded random locations and noise seeds) and its block structure; for every
colour pair the fraction of two-object scenes drawn with both requested colours (Wilson interval); and
Spearman's ρ between ``|cos(d_i, d_j)|`` and that success (seeded bootstrap interval over pairs). The work is
done by :mod:`scorescope.experiments.concepts` (the definitions are in its docstring); this module only parses
and checks options. Every option is checked before any sampling; a bad one is one usage error (exit 2) naming
the option. The run is resumable: finished colour pairs are kept in ``OUT/parts``.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _bad(err: Exception, option: str) -> typer.BadParameter:
    return typer.BadParameter(str(err), param_hint=f"'{option}'")


def concepts(
    model: str = typer.Option("colour", help="A colour-conditioned CLEVR model: 'colour' (shipped) or a pipeline / run folder."),
    out: Path = typer.Option(..., help="Output folder (settings.json, parts/, concepts.json, figures); resumable."),
    json_out: Path = typer.Option(None, "--json", help="Also write the result JSON here (it is always written to OUT/concepts.json)."),
    sites: str = typer.Option(
        None, help="Comma-separated module paths or globs and/or 'pixel' (the x̂₀ prediction); "
        "default: every trunk block that sees the conditioning, and pixel."),
    t: str = typer.Option("0.1,0.5,0.9", "--t", help="Noise fractions in [0, 1] for the cosines, comma-separated."),
    seeds: int = typer.Option(4, help="Forward-process noise seeds per concept (0 … seeds−1, >= 1); the same for every colour."),
    locations: int = typer.Option(8, help="Seeded random object locations per concept (>= 1); the same for every colour."),
    n: int = typer.Option(32, help="Two-object scenes sampled per colour pair (>= 1)."),
    steps: int = typer.Option(25, help="DDIM sampling steps (>= 1)."),
    colours: str = typer.Option(None, help="Comma-separated subset of the colours (default all 8: gray,red,blue,green,brown,purple,cyan,yellow)."),
    same: bool = typer.Option(True, help="Also sample pairs of one colour (i = j) as reference rows; never in the correlation."),
    bootstrap: int = typer.Option(2000, help="Bootstrap resamples over pairs for the interval of Spearman's rho (>= 1)."),
    seed: int = typer.Option(0, help="Seed of the concept locations, the scene locations, the sampling noise and the bootstrap (>= 0)."),
    figures: bool = typer.Option(True, help="Write the figures (cosine heatmaps per site, palette, scatter); the JSON always."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda when present)."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty OUT that is not this command's (nothing in it is deleted)."),
) -> None:
    """Colour concepts: d_i cosine matrices per site and t, composition success per pair, and their correlation.

    Example: ``scorescope features concepts --model colour --out runs/concepts --json concepts.json --n 48``.
    """
    import torch

    from scorescope.experiments import concepts as cx

    try:
        colour_list = cx.parse_colours(colours)
    except ValueError as err:
        raise _bad(err, "--colours") from None
    try:
        levels = cx.parse_levels(t)
    except ValueError as err:
        raise _bad(err, "--t") from None
    if device is not None and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise _bad(ValueError(f"device must be cpu or cuda, got {device!r}"), "--device")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise _bad(ValueError("no CUDA device is available; use --device cpu"), "--device")
    try:
        res = cx.run_concepts(
            model, out=out, sites=sites, t=levels, seeds=seeds, locations=locations, n=n, steps=steps,
            colours=colour_list, seed=seed, same=same, n_boot=bootstrap, json_path=json_out, overwrite=overwrite,
            device=device, figures=figures, progress=typer.echo,
        )
    except cx.OptionError as err:
        raise _bad(err, err.option) from None
    except FileExistsError as err:
        raise _bad(err, "--out") from None
    best = res.data.get("best")
    if best:
        c = res.data["correlation"][best["site"]][best["t"]]
        ci = "" if c["lo"] is None else f" [{c['lo']:.3f}, {c['hi']:.3f}]"
        typer.echo(f"best layer {best['site']} at t={best['t']}: Spearman rho {c['rho']:.3f}{ci}")
    typer.echo(f"{len(res.ran)} pairs sampled, {len(res.skipped)} resumed, {res.wall_s:.0f} s; {res.paths['json']}")
