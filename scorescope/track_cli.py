"""``scorescope clevr track``: locality and length generalisation of a model through training.

    scorescope clevr train --recipe exp1 --out runs/exp1 --snapshot-every 500
    scorescope clevr track --run exp1=runs/exp1 --run exp2=runs/exp2 --counts 3,6,8 --n 32 --out runs/track
    scorescope clevr track --run exp1=runs/exp1 --out runs/track --list     # snapshots found, units still to do

The work is done by :mod:`scorescope.experiments.track`; this module parses and checks the options (every one
before any model is loaded; a bad one is one usage error naming it, exit status 2). It lives in the
application layer because it combines the CLEVR world (training snapshots, length evaluation) with the probes.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from scorescope.experiments.track import DEFAULT_SITES


def _bad(err: Exception, option: str) -> typer.BadParameter:
    return typer.BadParameter(str(err), param_hint=f"'{option}'")


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _bad(ValueError(f"cannot parse {text!r}: give comma-separated numbers such as 0.9,0.5"), option) from None


def track(
    run: List[str] = typer.Option(..., "--run", help="A training run folder with snapshots (clevr train --snapshot-every), as LABEL=FOLDER or FOLDER (label: the folder name). Repeat for several models in one table and figure."),
    out: Path = typer.Option(..., help="Track folder (parts/, results.csv, results.json, track.png); resumable: a rerun measures only new snapshots."),
    counts: str = typer.Option("4,6,8", help="Requested object counts of the length evaluation, e.g. 4,6,8 or 1-10."),
    n: int = typer.Option(64, help="Scenes per count (>= 1)."),
    seed: int = typer.Option(0, help="Seed of the requested locations, the sampling noise, the probe scenes and the probe noise (>= 0)."),
    steps: int = typer.Option(25, help="DDIM steps of the length evaluation (>= 1)."),
    probe_k: int = typer.Option(3, help="Objects per probe scene (conditional locality and CPC residual)."),
    probe_scenes: int = typer.Option(2, help="Number of fixed probe scenes (>= 1)."),
    probe_seeds: int = typer.Option(2, help="Forward-process noise seeds per probe scene (>= 1)."),
    levels: str = typer.Option("0.9,0.5", help="Noise fractions t of the probes (a high and a mid level), comma-separated."),
    radius: float = typer.Option(0.2, help="In-region and CPC mask radius (normalised units)."),
    directions: int = typer.Option(4, help="Random directions of the JVP conditional-locality map (>= 1)."),
    sites: str = typer.Option(",".join(DEFAULT_SITES), help="Feature-profile sites (scorescope.experiments.feature_profile), comma-separated module paths or globs; default: the mid block's and up_blocks.1's first cross-attention; 'none' skips the profile. May change between runs of one OUT."),
    every: Optional[int] = typer.Option(None, help="Measure only the snapshots whose step is a multiple of N (a coarse pass; a later run without it fills in the rest). Default: all."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary JSON (settings, rows, machine, wall times) here."),
    figure_out: Optional[Path] = typer.Option(None, "--figure", help="Also write the figure here (format from the suffix)."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty OUT that is not a track folder (nothing is deleted)."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when present)."),
    threads: Optional[int] = typer.Option(None, help="torch.set_num_threads (>= 1)."),
    list_only: bool = typer.Option(False, "--list", help="Print the snapshots found and the units still to do, and exit (nothing is run or written)."),
) -> None:
    """Measure every EMA snapshot of training runs: length generalisation, conditional locality, CPC residual.

    One tidy table (results.csv / results.json) and one figure (track.png) against training step. Example:

        scorescope clevr track --run exp1=/work/runs/exp1 --run exp2=/work/runs/exp2 --counts 3,6,8 --n 32 --out runs/track
    """
    import torch

    from interp.clevr.evaluate import parse_counts
    from scorescope.experiments import track as tr

    try:
        ks = parse_counts(counts)
    except ValueError as err:
        raise _bad(err, "--counts") from None
    if threads is not None and threads < 1:
        raise _bad(ValueError(f"threads must be >= 1, got {threads}"), "--threads")
    if device is not None and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise _bad(ValueError(f"device must be cpu or cuda, got {device!r}"), "--device")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise _bad(ValueError("no CUDA device is available; use --device cpu"), "--device")
    try:
        cfg = tr.check_config(tr.TrackConfig(
            counts=tuple(ks), n=n, seed=seed, steps=steps, probe_k=probe_k, probe_scenes=probe_scenes,
            probe_seeds=probe_seeds, levels=tuple(_floats(levels, "--levels")), radius=radius, directions=directions,
        ))
        runs = tr.parse_runs(run)
        tr.check_every(every)
    except tr.TrackError as err:
        raise _bad(err, err.option) from None
    site_list = tr.parse_sites(sites)
    if site_list and not tr.feature_profile_available():
        raise _bad(ValueError(f"feature sites need {tr.FEATURE_MODULE}, which is not installed; pass --sites none"), "--sites")
    if list_only:
        units = tr.plan_units(runs, site_list, every)
        todo = set(tr.pending(out, units))
        for label, folder in runs.items():
            steps_found = sorted({u.step for u in units if u.label == label})
            typer.echo(f"{label}\t{folder}\t{len(steps_found)} snapshots: {', '.join(map(str, steps_found))}")
        for u in units:
            typer.echo(f"{'todo' if u in todo else 'done'}\t{u.describe()}")
        typer.echo(f"{len(todo)} of {len(units)} units still to do")
        return
    if threads:
        torch.set_num_threads(threads)
    try:
        res = tr.run_track(runs, out, cfg, sites=site_list, every=every, json_path=json_out, figure_path=figure_out,
                           overwrite=overwrite, device=device, progress=typer.echo)
    except tr.TrackError as err:
        raise _bad(err, err.option) from None
    typer.echo(f"{len(res.ran)} units run, {len(res.skipped)} resumed, {res.wall_s:.0f} s; "
               + ", ".join(str(p) for p in res.paths.values()))
