"""The command line mounts every command group and the demo runs end to end."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from interp.cli import app


def test_cli_mounts_all_command_groups():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for group in ("demo", "clevr", "locality", "version"):
        assert group in result.output
