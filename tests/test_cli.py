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


# ------------------------------------------------------------------------------------ help and user errors
def _commands():
    """Every command and group of the mounted CLI, as argument paths (the root is ``[]``)."""
    import typer

    def walk(cmd, path):
        yield path
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


COMMANDS = _commands()


def test_the_walk_reaches_every_group_and_leaf():
    assert len(COMMANDS) >= 20 and ["demo"] in COMMANDS and ["clevr", "track"] in COMMANDS
    assert ["intervene", "locality-sweep"] in COMMANDS and ["features", "sdxl"] in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "scorescope")
def test_every_command_help_shows_an_example(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    # the example is a runnable command line of this command
    assert f"scorescope {' '.join(path)}".strip() in " ".join(result.output.split())


def _bad_values(tmp):
    """One bad option value per command group: (argv, the option the error must name)."""
    return [
        (["clevr", "eval", "--model", "exp1", "--n", "0", "--counts", "1", "--json", str(tmp / "e.json")], "--n"),
        (["clevr", "eval", "--n", "abc"], "--n"),
        (["locality", "cpc", "--model", "no-such-model"], "--model"),
        (["locality", "pixel", "--model", "tiny-clevr", "--t", "half"], "--t"),
        (["intervene", "locality-sweep", "--model", "exp2", "--counts", "1-99", "--out", str(tmp / "s")], "--counts"),
        (["features", "profile", "--model", "exp1", "--t", "abc", "--out", str(tmp / "p")], "--t"),
        (["export", "maps", "--model", "exp1", "--probe", "nope", "--out", str(tmp / "x")], "--probe"),
        (["demo", "--seed", "-1", "--out", str(tmp / "d")], "--seed"),
        (["clevr", "track", "--run", "exp1=" + str(tmp / "none"), "--counts", "1-99", "--out", str(tmp / "t")], "--counts"),
    ]


def test_a_bad_option_value_is_one_stderr_line_and_exit_2(tmp_path):
    for argv, option in _bad_values(tmp_path):
        result = runner.invoke(app, argv)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2, (argv, result.output)
        assert len(lines) == 1, (argv, result.stderr)
        assert lines[0].startswith("error: ") and option in lines[0], (argv, lines[0])
        assert "Traceback" not in result.output and result.stdout == "", argv


def test_debug_flag_and_env_show_the_traceback(tmp_path, monkeypatch):
    argv = ["clevr", "eval", "--model", "exp1", "--n", "0", "--counts", "1", "--json", str(tmp_path / "e.json")]
    flagged = runner.invoke(app, [*argv, "--debug"])
    assert flagged.exit_code == 2 and "Traceback (most recent call last)" in flagged.stderr
    assert flagged.stderr.rstrip().splitlines()[-1].startswith("error: ")
    monkeypatch.setenv("SCORESCOPE_DEBUG", "1")
    env = runner.invoke(app, argv)
    assert env.exit_code == 2 and "Traceback (most recent call last)" in env.stderr
    monkeypatch.setenv("SCORESCOPE_DEBUG", "0")
    assert "Traceback" not in runner.invoke(app, argv).stderr


def test_debug_flag_is_taken_anywhere_before_a_double_dash():
    from scorescope.cli import debug_requested

    assert debug_requested(["clevr", "--debug", "eval"]) == (True, ["clevr", "eval"])
    assert debug_requested(["x", "--", "--debug"])[1] == ["x", "--", "--debug"]  # after "--" it is an argument
