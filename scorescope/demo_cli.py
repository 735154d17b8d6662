"""``scorescope demo``: the command (the study itself is :mod:`scorescope.demo`)."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("scorescope-demo"), help="Folder for the demo's outputs (new, empty or an earlier demo's)."),
    model: str = typer.Option("default", help="Model captured and mapped ('default': the shipped exp1 checkpoint); "
                                              "the study always compares exp1, exp2 and exp3."),
    seed: int = typer.Option(0, help="Seed for every random choice (>= 0)."),
    quick: bool = typer.Option(False, help="A reduced run (tiny n, few steps; under a minute): checks the pipeline, "
                                           "its numbers are noise."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty folder that is not an earlier demo's (nothing in it is deleted)."),
) -> None:
    """The CLEVR study on the shipped checkpoints: length generalisation of exp1/exp2/exp3, locality maps, CPC
    residual, a layer profile, a locality intervention on exp2, and report.md / report.html in OUT (a few minutes
    on 2 CPU cores).

    Example: scorescope demo --out scorescope-demo
    """
    from interp.clevr.evaluate import OptionError
    from scorescope.demo import run_demo

    try:
        summary = run_demo(out, model=model, seed=seed, overwrite=overwrite, quick=quick)
    except FileExistsError as err:
        raise typer.BadParameter(str(err), param_hint="'--out'") from None
    except OptionError as err:
        # a sub-experiment's folder under OUT/work/ made with other settings is a problem of --out
        option = "--out" if err.option in ("--out", "--parts") else err.option
        raise typer.BadParameter(str(err), param_hint=f"'{option}'") from None
    for line in summary:
        typer.echo(line)
