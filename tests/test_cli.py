"""The command line mounts every command group, each with its real subcommands."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from scorescope.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "group, subcommands",
    [("clevr", ["train", "eval"]), ("locality", ["sweep", "pixel", "cond", "cpc"])],
)
def test_command_groups_are_mounted_with_their_subcommands(group, subcommands):
    result = runner.invoke(app, [group, "--help"])
    assert result.exit_code == 0, result.output
    for sub in subcommands:
        assert sub in result.output


def test_top_level_help_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output
    from interp.metadata import version

    assert runner.invoke(app, ["version"]).output.strip() == version()
