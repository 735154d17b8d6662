"""``scorescope demo``: the command (the study itself is :mod:`scorescope.demo`)."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("scorescope-demo"), help="Folder for the demo's outputs."),
    model: str = typer.Option("default", help="Model name ('default': a shipped CLEVR checkpoint if present, else the bundled tiny models)."),
    seed: int = typer.Option(0, help="Seed for every random choice."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty folder that is not an earlier demo's (nothing in it is deleted)."),
) -> None:
    """Capture activations and compute a locality map on a model, writing figures, tables and tensors to OUT."""
    from scorescope.demo import run_demo

    try:
        summary = run_demo(out, model=model, seed=seed, overwrite=overwrite)
    except FileExistsError as err:
        raise typer.BadParameter(str(err), param_hint="--out") from None
    for line in summary:
        typer.echo(line)
