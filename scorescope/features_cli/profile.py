"""``scorescope features profile``: a layer × noise-level profile of feature-space conditional locality.

Only parses and checks options; the work is :func:`scorescope.experiments.feature_profile.run_profile`. Every
option is checked before the model runs, and a bad one is reported as one usage error naming the option
(exit status 2).
"""

from __future__ import annotations

from pathlib import Path

import typer


def _bad(err: Exception, option: str) -> typer.BadParameter:
    return typer.BadParameter(" ".join(str(err).split()), param_hint=f"'{option}'")


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _bad(ValueError(f"expected comma-separated numbers, got {text!r}"), option) from None


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _bad(ValueError(f"expected comma-separated integers >= 0 such as 0,1,2, got {text!r}"), option) from None


def profile(
    model: str = typer.Option(..., help="exp1 | exp2 | exp3 | colour | tiny-clevr | pipeline folder | run folder."),
    out: Path = typer.Option(..., help="Output folder (parts/, results.csv, profile.png: a layer x t heatmap per metric); resumable."),
    sites: str = typer.Option(
        "auto", help="Layers: module paths or globs, comma-separated (e.g. '*attn2,*resnets*'); a glob keeps the outermost "
        "matched modules with a spatial output. 'auto': every cross-attention layer and residual block."),
    t: str = typer.Option("0.1,0.5,0.9", help="Noise fractions in [0, 1], comma-separated."),
    seeds: str = typer.Option("0", help="Seeds, comma-separated integers >= 0; each seeds one scene and its noise (one row set per seed)."),
    k: int = typer.Option(3, help="Objects per scene (1..4), kept 0.4 apart at seeded random locations (colour model: random colours)."),
    radius: float = typer.Option(0.2, help="In-region disc radius in normalised units (the same region at every layer's resolution)."),
    directions: str = typer.Option("8", help="JVP directions per conditioner: a positive integer (random, seeded) or 'all' (exact)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the tidy rows, settings, metadata, machine and wall time here."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda when present)."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty OUT that is not this command's (nothing in it is deleted)."),
) -> None:
    """Spatial locality, channel sparsity and effective conditioners of |dh_L/dc_j| per layer and noise level.

    Example:

        scorescope features profile --model exp1 --sites '*attn2,*resnets*' --t 0.1,0.5,0.9 --seeds 0,1 --out runs/prof --json prof.json
    """
    import torch

    from scorescope.experiments.feature_profile import OptionError, check_options, run_profile

    levels = _floats(t, "--t")
    seed_list = _ints(seeds, "--seeds")
    dirs: int | str = directions.strip()
    if dirs != "all":
        try:
            dirs = int(dirs)
        except ValueError:
            raise _bad(ValueError(f"directions must be 'all' or a positive integer, got {directions!r}"), "--directions") from None
    try:
        check_options(t=levels, seeds=seed_list, radius=radius, directions=dirs, k=k, sites=sites)
    except OptionError as err:
        raise _bad(err, err.option) from None
    if device is not None and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise _bad(ValueError(f"device must be cpu or cuda, got {device!r}"), "--device")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise _bad(ValueError("no CUDA device is available; use --device cpu"), "--device")
    try:
        res = run_profile(model, out=out, sites=sites, t=levels, seeds=seed_list, k=k, radius=radius, directions=dirs,
                          json_path=json_out, device=device, overwrite=overwrite, progress=typer.echo)
    except OptionError as err:
        raise _bad(err, err.option) from None
    except FileExistsError as err:
        raise _bad(err, "--out") from None
    typer.echo(f"{len(res.ran)} units run, {len(res.skipped)} resumed, {res.wall_s:.1f} s; "
               + ", ".join(str(p) for p in res.paths.values()))
