"""The ``scorescope`` command line (the application layer's root).

Command groups are plugins: each package declares a Typer app under the ``scorescope.commands`` entry
point group in ``pyproject.toml`` (``clevr`` from ``interp.clevr``, ``locality`` from ``probes``), and this
module mounts whatever is installed. A third-party group whose imports fail is skipped with a warning; one of
scorescope's own groups failing is a bug and raises.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
import typer

app = typer.Typer(
    name="scorescope",
    help="Mechanistic interpretability of conditional diffusion models: capture, probe, intervene.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the installed scorescope version."""
    from interp.metadata import version as _v

    typer.echo(_v())


def _mount_plugins() -> None:
    for ep in entry_points(group="scorescope.commands"):
        try:
            sub = ep.load()
        except ImportError as err:  # a third-party group with a missing dependency must not take the CLI down
            if os.environ.get("SCORESCOPE_DEBUG") or (ep.dist is not None and ep.dist.name == "scorescope"):
                raise
            typer.echo(f"warning: command group {ep.name!r} failed to load: {err}", err=True)
            continue
        app.add_typer(sub, name=ep.name)


_mount_plugins()

# The application's own experiments are mounted directly (the application layer may import what it likes).
from interp.clevr.cli import app as _clevr_app  # noqa: E402
from scorescope.demo_cli import demo as _demo  # noqa: E402
from scorescope.export_cli import app as _export_app  # noqa: E402
from scorescope.features_cli import app as _features_app  # noqa: E402
from scorescope.intervene_cli import app as _intervene_app  # noqa: E402
from scorescope.track_cli import track as _track  # noqa: E402

app.command("demo")(_demo)
app.add_typer(_intervene_app, name="intervene")
app.add_typer(_features_app, name="features")
app.add_typer(_export_app, name="export")
# `clevr track` combines the world with the probes, so it lives in the application and joins the world's group.
_clevr_app.command("track")(_track)


def main() -> None:  # pragma: no cover - console script
    app()
