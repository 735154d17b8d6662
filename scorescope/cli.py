"""The ``scorescope`` command line (the application layer's root).

Command groups are plugins: each package declares a Typer app under the ``scorescope.commands`` entry
point group in ``pyproject.toml`` (``clevr`` from ``interp.clevr``, ``locality`` from ``probes``), and this
module mounts whatever is installed. A third-party group whose imports fail is skipped with a warning; one of
scorescope's own groups failing is a bug and raises.

User errors, once for every command (:class:`ScorescopeGroup`): a bad option value — a usage error (typer's ``UsageError``) such as
the ``typer.BadParameter`` every command raises after checking its options, or an
:class:`interp.clevr.evaluate.OptionError` (a ``ValueError`` naming its option) that reaches the root — prints
**one line** on stderr, ``error: <what is wrong and the fix> (scorescope <command> --help)``, and exits 2, with no
traceback. ``--debug`` (anywhere on the command line) or ``SCORESCOPE_DEBUG=1`` prints the traceback as well. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

import typer
from typer._click.exceptions import NoArgsIsHelpError  # typer vendors click: its exceptions are not click's
from typer.core import TyperGroup

from interp.clevr.evaluate import OptionError

#: Exit status of a user error (click's usage-error status).
USAGE_EXIT = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "SCORESCOPE_DEBUG"


def debug_requested(args: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether tracebacks were asked for (``--debug`` before any ``--``, or ``SCORESCOPE_DEBUG`` set to anything but
    ``""`` / ``"0"``), and ``args`` without the flag."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    flagged = DEBUG_FLAG in args[:end]
    kept = [a for i, a in enumerate(args) if not (i < end and a == DEBUG_FLAG)]
    return flagged or os.environ.get(DEBUG_ENV, "") not in ("", "0"), kept


def error_line(err: BaseException, command: str | None = None) -> str:
    """The one line a user error prints: the message on one line, the option named, and where help is."""
    if isinstance(err, typer.TyperException):
        message = err.format_message()
        ctx = getattr(err, "ctx", None)
        command = ctx.command_path if ctx is not None else command
    elif isinstance(err, OptionError):
        message = f"Invalid value for '{err.option}': {err}"
    else:
        message = str(err)
    where = f" (see '{command} --help')" if command else ""
    return "error: " + " ".join(message.split()) + where


class ScorescopeGroup(TyperGroup):
    """The root command: runs the command line and turns user errors into one line and exit status 2."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        debug, argv = debug_requested(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(args=argv, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as err:  # a bare group: its help (typer's groups have printed it already)
            if err.format_message().strip():
                err.show()
            rv = err.exit_code
        except (typer.TyperException, OptionError) as err:
            if debug:
                traceback.print_exception(err, file=sys.stderr)
            typer.echo(error_line(err, prog_name or "scorescope"), err=True)
            rv = err.exit_code if isinstance(err, typer.TyperException) else USAGE_EXIT
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            rv = 1
        if not standalone_mode:
            return rv
        # standalone_mode=False returns the exit status of typer.Exit / --help, or a command's return value (None)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="scorescope",
    cls=ScorescopeGroup,
    help="Mechanistic interpretability of conditional diffusion models: capture, probe, intervene.\n\n"
         "Example: scorescope demo --out scorescope-demo\n\n"
         "Add --debug (or set SCORESCOPE_DEBUG=1) to see the traceback behind an error.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the installed scorescope version.

    Example: scorescope version
    """
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
