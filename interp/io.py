"""Files scorescope writes: atomically, never over what it did not create.

Two rules from DEVELOPERS.md live here, once:

* **Writes are atomic.** :func:`atomic_write` writes a uniquely named temporary file in the target's folder
  (``mkstemp``: unpredictable name, created with ``O_EXCL`` so a planted symlink is never followed), fsyncs
  it, gives it the permissions of an ordinary file (``0o666`` minus the umask, like ``open(..., "w")``) and
  renames it over the target. Readers see the old file or the new one, never a partial one; a crash leaves
  at most a hidden ``.NAME.*.tmp`` file behind.
* **Nothing is lost.** :func:`prepare_output_dir` accepts a folder that is missing, empty, or marked as made
  by scorescope for the same purpose (a small ``.scorescope.json`` marker written when the folder is
  claimed); any other non-empty folder is refused unless ``overwrite=True``, and even then only the
  entries the command names are replaced — a user's own files are never deleted.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

MARKER = ".scorescope.json"
"""File that marks a folder as created by a scorescope command (``{"kind": ..., "version": ...}``)."""


def file_mode() -> int:
    """The permissions of an ordinary new file: ``0o666`` minus the umask (like ``open(..., "w")``).

    ``os.umask`` can only be read by setting it (and at once restoring it), and the umask is process-global: a
    writer thread takes this value from its creator instead of reading it while other threads create files.
    """
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_with(path: str | Path, write: Callable[[str], None], *, mode: int | None = None) -> Path:
    """The general form of :func:`atomic_write`: ``write(tmp_name)`` fills a fresh temporary file beside ``path``
    (for writers that take a file name, e.g. ``safetensors.torch.save_file``: no bytes blob in memory); then fsync,
    ``chmod mode`` (default :func:`file_mode`), rename over ``path``. Nothing is left behind when ``write`` raises.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write a file at {path}: it is a folder; pass a file path")
    mode = file_mode() if mode is None else mode
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write(path: str | Path, data: bytes | str, *, encoding: str = "utf-8") -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns ``path``.

    Args:
        path: the target file; its folder must exist.
        data: bytes, or text encoded with ``encoding``.

    Raises:
        IsADirectoryError: ``path`` is an existing folder.
        OSError: the folder is not writable (nothing is left behind).
    """
    blob = data.encode(encoding) if isinstance(data, str) else bytes(data)

    def write(name: str) -> None:
        with open(name, "wb") as fh:
            fh.write(blob)

    return atomic_write_with(path, write)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    """:func:`atomic_write` of ``json.dumps(obj)``."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=str))


def check_writable_file(path: str | Path, *, what: str = "output file") -> Path:
    """Fail *before* a long run if ``path`` cannot be written later (a folder, or a folder that is not writable).

    Creates the parent folder if needed. Raises ``ValueError`` naming ``what`` and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"the {what} {path} is a folder; pass a file path such as {path / 'result.json'}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the folder of the {what} {path}: {err}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"the {what} {path} cannot be written: {parent} is not writable; choose another path")
    return path


def check_settings(path: str | Path, settings: dict[str, Any], fixed: tuple[str, ...], *, may_change: str) -> None:
    """Record a resumable run's ``settings`` at ``path`` (JSON), refusing a stored run whose ``fixed`` keys differ.

    The error names each differing key as ``(stored, requested)`` and what may change between runs (``may_change``).
    Shared by every resumable sweep, so "same folder, other settings" is refused the same way everywhere.
    """
    path = Path(path)
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), settings.get(k)) for k in fixed if old.get(k) != settings.get(k)}
        if diff:
            raise ValueError(
                f"{path.parent} holds a sweep with different settings: it was run with other settings {diff} "
                f"(stored, requested); use another --out folder ({may_change} may change between runs, the rest may not)"
            )
    atomic_write_json(path, settings)


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The scorescope marker of ``folder`` (``None`` when absent or unreadable)."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def prepare_output_dir(folder: str | Path, kind: str, *, overwrite: bool = False, reuse_own: bool = True) -> Path:
    """Claim ``folder`` for a command of ``kind`` (``"demo"``, ``"clevr-train"``, ...) and return it.

    Accepted: a missing or empty folder; a folder marked with the same ``kind`` when ``reuse_own`` (the
    command then replaces or extends only its own files: a rerun, a resume). Refused with a
    ``FileExistsError`` naming ``--overwrite``: any other non-empty folder — a user's folder, or another
    command's output.

    ``overwrite=True`` on a foreign folder writes the marker only where there is none (another command's marker
    is left as it is) and deletes nothing; the command must still replace only the files it writes.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; pass a folder path for the output")
    entries = [p for p in folder.iterdir()] if folder.exists() else []
    marker = read_marker(folder)
    ours = marker is not None and marker.get("kind") == kind
    if entries and not overwrite and not (ours and reuse_own):
        what = f"holds the output of another scorescope command ({marker.get('kind')})" if marker else "is not empty"
        raise FileExistsError(
            f"{folder} {what}; choose a new folder, or pass --overwrite (overwrite=True) to write "
            "into it (only the files this command writes are replaced; nothing else is deleted)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    # Mark the folder as ours only if nothing is marked yet: another command's marker (or a file of that name we
    # cannot read) is not ours to rewrite. Such a folder then needs --overwrite again on the next run.
    if not (folder / MARKER).exists():
        from interp.metadata import version

        atomic_write_json(folder / MARKER, {"kind": kind, "version": version()})
    return folder


__all__ = [
    "MARKER",
    "atomic_write",
    "atomic_write_json",
    "check_settings",
    "check_writable_file",
    "prepare_output_dir",
    "read_marker",
]
