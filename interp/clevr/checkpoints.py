"""Shipping CLEVR reference checkpoints: export a training run's EMA weights into ``interp/assets/clevr``.

Loading them is the model zoo's job (:mod:`interp.models.shipped`: ``load_clevr``, ``available``); this
module writes them: fp16 weights under the size limits, and the run's provenance and evaluation table in
``MANIFEST.json``.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from interp.io import atomic_write_json
from interp.models.shipped import ASSETS, MANIFEST, SHIPPED, available, load_clevr, read_manifest

#: Size limits of the shipped weights (bytes).
MAX_BYTES_EACH = 10 * 2**20
MAX_BYTES_TOTAL = 40 * 2**20


def _write_manifest(data: dict[str, Any], path: Path = MANIFEST) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def ship(run_dir: str | Path, name: str, *, eval_result: dict[str, Any] | None = None, assets: Path = ASSETS, note: str = "") -> Path:
    """Export a run's latest EMA weights as shipped checkpoint ``name`` (fp16) and record it in the manifest."""
    from interp.clevr.train import pipeline_from_checkpoint, swap_in_folder

    if name not in SHIPPED:
        raise ValueError(f"shipped checkpoint names are {SHIPPED}, got {name!r}")
    dest = Path(assets) / name
    # Only a previous shipped pipeline is ever replaced; checked before the export does any work.
    if os.path.lexists(dest) and not (dest.is_dir() and not dest.is_symlink() and (dest / "model_index.json").is_file()):
        raise FileExistsError(f"{dest} exists and is not a shipped pipeline folder (no model_index.json); move it away")
    pipe = pipeline_from_checkpoint(run_dir)
    state = pipe._scorescope_state
    Path(assets).mkdir(parents=True, exist_ok=True)
    # A fresh, uniquely named folder beside the destination: nothing but this export is ever deleted.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=assets))
    try:
        pipe.to(torch.float16).save_pretrained(str(tmp))
        size = folder_bytes(tmp)
        if size > MAX_BYTES_EACH:
            raise ValueError(f"checkpoint {name} is {size / 2**20:.1f} MiB, over the {MAX_BYTES_EACH / 2**20:.0f} MiB limit")
    except BaseException:
        shutil.rmtree(tmp)  # the export folder this call created, nothing else
        raise
    swap_in_folder(tmp, dest)  # the previous shipped checkpoint of this name is renamed aside, then deleted
    with _manifest_lock(Path(assets)):
        return _record(pipe, state, name, dest, size, eval_result, Path(assets), note)


def _manifest_lock(assets: Path):
    """An exclusive lock on the manifest (several runs may be shipped in parallel)."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def lock():
        import hashlib
        import tempfile

        key = hashlib.sha1(str(assets.resolve()).encode()).hexdigest()[:12]
        with open(Path(tempfile.gettempdir()) / f"scorescope-clevr-manifest-{key}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return lock()


def _record(pipe: Any, state: dict[str, Any], name: str, dest: Path, size: int, eval_result: dict[str, Any] | None, assets: Path, note: str) -> Path:
    manifest = read_manifest(Path(assets) / "MANIFEST.json")
    n_params = sum(p.numel() for p in pipe.unet.parameters()) + sum(p.numel() for p in pipe.location_encoder.parameters())
    entry = {
        "recipe": state["recipe"],
        "steps": state["step"],
        "seed": state["seed"],
        "wall_time_s": round(state["wall_s"], 1),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {torch.__version__}, 1 thread per run",
        "parameters": n_params,
        "dtype": "float16",
        "bytes": size,
        "unet_class": type(pipe.unet).__name__,
        "encoder_class": type(pipe.location_encoder).__name__,
        "note": note,
    }
    if eval_result is not None:
        entry["eval"] = {"meta": eval_result["meta"], "per_k": eval_result["per_k"]}
    manifest.setdefault("models", {})[name] = entry
    total = sum(folder_bytes(Path(assets) / n) for n in manifest["models"] if (Path(assets) / n).exists())
    if total > MAX_BYTES_TOTAL:
        raise ValueError(f"shipped checkpoints total {total / 2**20:.1f} MiB, over the {MAX_BYTES_TOTAL / 2**20:.0f} MiB limit")
    manifest["total_bytes"] = total
    _write_manifest(manifest, Path(assets) / "MANIFEST.json")
    return dest


__all__ = [
    "ASSETS", "MANIFEST", "MAX_BYTES_EACH", "MAX_BYTES_TOTAL", "SHIPPED", "available", "folder_bytes", "load_clevr",
    "read_manifest", "ship",
]
