"""``scorescope intervene``: experiments that edit a model at inference time.

    scorescope intervene locality-sweep --model exp2 --counts 4,6,8 --n 32 --seed 0 --out runs/iv --json iv.json
    scorescope intervene locality-sweep --model exp2 --out runs/iv --list          # the intervention names
    scorescope intervene locality-sweep --model exp2 --out runs/iv --only 'unpatched,mask:up:*'

The work is done by :mod:`scorescope.experiments.locality_sweep`; this module only parses and checks options.
Under ``torchrun --nproc_per_node=N`` the (intervention, k) units are split across N processes
(:mod:`interp.distributed`); rank 0 writes the same table as one process.
``--counts``, ``--n``, ``--seed`` and ``--steps`` are parsed and checked as in ``scorescope clevr eval``; every
option is checked before any sampling, and a bad one is reported as one usage error naming the option.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Interventions: enforce locality inside a trained model and measure what it restores.\n\n"
                  "Example: scorescope intervene locality-sweep --model exp2 --counts 4,6,8 --n 32 --out runs/sweep",
                  no_args_is_help=True, add_completion=False)


def _bad(err: Exception, option: str) -> typer.BadParameter:
    return typer.BadParameter(str(err), param_hint=f"'{option}'")


@app.command("locality-sweep")
def locality_sweep(
    model: str = typer.Option(..., help="exp1 | exp2 | exp3 | tiny-clevr | pipeline folder | run folder."),
    out: Path = typer.Option(..., help="Sweep folder (parts/, results.csv, heatmap.png, samples/); resumable."),
    counts: str = typer.Option("1-10", help="Requested object counts, e.g. 1-10 or 4,6,8."),
    n: int = typer.Option(64, help="Scenes per count (>= 1)."),
    seed: int = typer.Option(0, help="Seed of the requested locations and the sampling noise (>= 0)."),
    steps: int = typer.Option(25, help="DDIM steps (>= 1); the high-noise edits act on the first half."),
    radii: str = typer.Option("0.15", help="Mask / composition radii (normalised units), comma-separated."),
    only: str = typer.Option(None, help="Run only these interventions: names or globs, comma-separated (see --list)."),
    references: str = typer.Option(
        "auto", help="Models evaluated unpatched beside it, comma-separated; 'auto': exp1,exp3 for exp2; 'none'."
    ),
    json_out: Path = typer.Option(None, "--json", help="Also write the table, settings, machine and wall time here."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty OUT that is not this sweep's (nothing is deleted)."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda when present)."),
    threads: int = typer.Option(None, help="torch.set_num_threads (>= 1)."),
    list_only: bool = typer.Option(False, "--list", help="Print the intervention names and exit (nothing is run)."),
) -> None:
    """Length generalisation under each locality intervention: a tidy table, a heatmap and samples.

    Example: scorescope intervene locality-sweep --model exp2 --counts 6 --n 16 --only 'compose-block:*' --out runs/sweep
    """
    import torch

    from interp.clevr.evaluate import OptionError, check_eval_options, parse_counts
    from interp.distributed import RankAborted
    from scorescope.experiments import locality_sweep as ls

    try:
        ks = parse_counts(counts)
    except ValueError as err:
        raise _bad(err, "--counts") from None
    try:
        check_eval_options(n=n, seed=seed, steps=steps)
    except OptionError as err:
        raise _bad(err, err.option) from None
    if threads is not None and threads < 1:
        raise _bad(ValueError(f"threads must be >= 1, got {threads}"), "--threads")
    try:
        radius_list = ls.check_radii([float(v) for v in radii.split(",") if v.strip()])
    except ValueError as err:
        raise _bad(ValueError(f"{err} (got {radii!r})"), "--radii") from None
    if references == "auto":
        refs = ls.default_references(model)
    elif references.strip().lower() == "none":
        refs = []
    else:
        refs = [r.strip() for r in references.split(",") if r.strip()]
    if device is not None and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise _bad(ValueError(f"device must be cpu or cuda, got {device!r}"), "--device")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise _bad(ValueError("no CUDA device is available; use --device cpu"), "--device")
    if json_out is not None:
        from interp.io import check_writable_file

        try:
            check_writable_file(json_out, what="--json file")
        except ValueError as err:
            raise _bad(err, "--json") from None
    if threads:
        torch.set_num_threads(threads)

    from interp.models.registry import known_names, load_model

    for ref in refs:
        if ref not in known_names() and not Path(ref).is_dir():
            raise _bad(ValueError(f"unknown reference model {ref!r}; known: {', '.join(known_names())} or a folder"), "--references")
    if list_only:
        try:
            pipe = load_model(model).pipeline
        except (ValueError, FileNotFoundError) as err:
            raise _bad(err, "--model") from None
        plan = ls.plan_interventions(ls.attn2_layers(pipe), num_steps=steps, radii=radius_list, references=refs,
                                     blocks=ls.trunk_blocks(pipe.unet))
        try:
            plan = ls.select(plan, only)
        except ValueError as err:
            raise _bad(err, "--only") from None
        for inter in plan:
            typer.echo(f"{inter.name}\t{inter.kind}\t{inter.sites or '-'}\tsteps={inter.steps}")
        return
    try:
        res = ls.run_locality_sweep(
            model, counts=ks, out=out, n=n, seed=seed, steps=steps, radii=radius_list, only=only, references=refs,
            json_path=json_out, overwrite=overwrite, device=device, progress=typer.echo,
        )
    except OptionError as err:
        raise _bad(err, err.option) from None
    except FileExistsError as err:
        raise _bad(err, "--out") from None
    except RankAborted:
        raise typer.Exit(1) from None  # rank 0 reports the reason
    from interp.distributed import detect_env

    if detect_env().is_main:  # one summary line, from the rank that wrote the files
        typer.echo(f"{len(res.ran)} units run, {len(res.skipped)} resumed, {res.wall_s:.0f} s; "
                   + ", ".join(str(p) for p in res.paths.values()))
