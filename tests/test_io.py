"""interp.io: atomic writes that never follow planted symlinks, ordinary file modes, folders that are not ours refused."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from interp.io import MARKER, atomic_write, atomic_write_with, check_writable_file, prepare_output_dir
from interp.results import ProbeResult


def test_atomic_write_replaces_a_planted_symlink_instead_of_following_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "result.json"
    link.symlink_to(victim)
    ProbeResult("demo", maps={"a": torch.zeros(2)}).save_json(link)
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and '"probe": "demo"' in link.read_text()


def test_atomic_write_gives_an_ordinary_mode_and_leaves_no_temp_file(tmp_path):
    path = atomic_write(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_with_a_failing_writer_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = atomic_write(tmp_path / "a.bin", b"old")

    def half_then_fail(name: str) -> None:
        with open(name, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    atomic_write_with(path, lambda name: open(name, "wb").write(b"new"), mode=0o600)
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_atomic_write_refuses_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="folder"):
        atomic_write(tmp_path, "x")


def test_check_writable_file_names_the_problem_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        check_writable_file(tmp_path, what="--json file")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot create the folder"):
        check_writable_file(blocker / "x.json", what="--json file")


def test_prepare_output_dir_claims_empty_refuses_foreign_and_reuses_its_own(tmp_path):
    out = prepare_output_dir(tmp_path / "new", "demo")
    assert (out / MARKER).is_file()
    (out / "table.csv").write_text("ours")
    assert prepare_output_dir(out, "demo") == out  # a rerun
    with pytest.raises(FileExistsError, match="another scorescope command"):
        prepare_output_dir(out, "clevr-train")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_output_dir(foreign, "demo")
    prepare_output_dir(foreign, "demo", overwrite=True)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_overwrite_never_rewrites_another_commands_marker(tmp_path):
    out = prepare_output_dir(tmp_path / "d", "demo")
    (out / "x.csv").write_text("demo output")
    before = (out / MARKER).read_text()
    prepare_output_dir(out, "locality-sweep", overwrite=True)
    assert (out / MARKER).read_text() == before
