"""The ``scorescope`` command line.

Command groups are plugins: each package declares a Typer app under the ``scorescope.commands`` entry
point group in ``pyproject.toml`` (``clevr`` from ``interp.clevr``, ``locality`` from ``probes``), and this
module mounts whatever is installed. ``interp`` therefore never imports ``probes`` or ``interventions``.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

import typer

app = typer.Typer(
    name="scorescope",
    help="Mechanistic interpretability of conditional diffusion models: capture, probe, intervene.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def demo(
    out: Path = typer.Option(Path("scorescope-demo"), help="Folder for the demo's outputs."),
    model: str = typer.Option("default", help="Model name ('default': a shipped CLEVR checkpoint if present, else the bundled tiny models)."),
    seed: int = typer.Option(0, help="Seed for every random choice."),
) -> None:
    """Capture activations and compute a locality map on a model, writing figures, tables and tensors to OUT."""
    from interp.experiments.demo import run_demo

    summary = run_demo(out, model=model, seed=seed)
    for line in summary:
        typer.echo(line)


@app.command()
def version() -> None:
    """Print the installed scorescope version."""
    from interp.metadata import version as _v

    typer.echo(_v())


def _mount_plugins() -> None:
    for ep in entry_points(group="scorescope.commands"):
        try:
            sub = ep.load()
        except Exception as err:  # a broken plugin must not take the whole CLI down
            if os.environ.get("SCORESCOPE_DEBUG"):
                raise
            typer.echo(f"warning: command group {ep.name!r} failed to load: {err}", err=True)
            continue
        app.add_typer(sub, name=ep.name)


_mount_plugins()


def main() -> None:  # pragma: no cover - console script
    app()
