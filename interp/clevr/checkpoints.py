"""Shipped CLEVR reference checkpoints: ``load_clevr("exp1")`` and friends.

Each checkpoint is a ``ClevrPipeline`` folder under ``interp/assets/clevr/<name>/`` with fp16 safetensors
weights (EMA), loaded back in float32. ``interp/assets/clevr/MANIFEST.json`` records, per name, the recipe,
steps, seed, wall time, machine, parameter count, file size and the length-generalisation table measured
on the shipped weights.

:func:`resolve_clevr` is the single place a CLEVR model name is turned into a pipeline: a shipped name, a
pipeline folder (``save_pretrained``), or a training run folder (``latest.json``; its EMA weights).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "clevr"
MANIFEST = ASSETS / "MANIFEST.json"
SHIPPED = ("exp1", "exp2", "exp3", "colour")
#: Size limits of the shipped weights (bytes).
MAX_BYTES_EACH = 10 * 2**20
MAX_BYTES_TOTAL = 40 * 2**20


def read_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    """The manifest as a dict (``{}`` with a ``"models"`` key when absent)."""
    if not path.exists():
        return {"models": {}}
    return json.loads(path.read_text())


def _write_manifest(data: dict[str, Any], path: Path = MANIFEST) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
    os.replace(tmp, path)


def load_clevr(name: str, *, device: str = "cpu", assets: Path = ASSETS):
    """Load shipped checkpoint ``name`` (``exp1``, ``exp2``, ``exp3``, ``colour``) as a float32 ClevrPipeline."""
    from interp.models.clevr import ClevrPipeline

    if name not in SHIPPED:
        raise ValueError(f"unknown CLEVR checkpoint {name!r}; shipped: {', '.join(SHIPPED)} (or pass a pipeline folder)")
    folder = Path(assets) / name
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"checkpoint {name!r} is not installed at {folder}; train it with "
            f"`scorescope clevr train --recipe {name} --out DIR` and load DIR instead"
        )
    pipe = ClevrPipeline.from_pretrained(str(folder), dtype=torch.float32)
    pipe._scorescope_name = name
    return pipe.to(device)


def resolve_clevr(name: str, *, device: str = "cpu"):
    """A CLEVR pipeline from a shipped name, a ``save_pretrained`` folder, or a training-run folder."""
    from interp.models.clevr import ClevrPipeline

    if name in SHIPPED:
        return load_clevr(name, device=device)
    if name == "tiny-clevr":
        from interp.models.clevr import clevr_pipeline

        return clevr_pipeline("tiny").to(device)
    path = Path(name)
    if (path / "model_index.json").exists():
        pipe = ClevrPipeline.from_pretrained(str(path), dtype=torch.float32)
        pipe._scorescope_name = path.name
        return pipe.to(device)
    if (path / "latest.json").exists():
        from interp.clevr.train import pipeline_from_checkpoint

        pipe = pipeline_from_checkpoint(path)
        pipe._scorescope_name = path.name
        return pipe.to(device)
    raise ValueError(
        f"unknown CLEVR model {name!r}: use one of {', '.join(SHIPPED)}, 'tiny-clevr', a folder saved with "
        "save_pretrained, or a training run folder (with latest.json)"
    )


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def ship(run_dir: str | Path, name: str, *, eval_result: dict[str, Any] | None = None, assets: Path = ASSETS, note: str = "") -> Path:
    """Export a run's latest EMA weights as shipped checkpoint ``name`` (fp16) and record it in the manifest."""
    from interp.clevr.train import pipeline_from_checkpoint

    if name not in SHIPPED:
        raise ValueError(f"shipped checkpoint names are {SHIPPED}, got {name!r}")
    pipe = pipeline_from_checkpoint(run_dir)
    state = pipe._scorescope_state
    dest = Path(assets) / name
    tmp = Path(assets) / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(str(tmp))
    size = folder_bytes(tmp)
    if size > MAX_BYTES_EACH:
        raise ValueError(f"checkpoint {name} is {size / 2**20:.1f} MiB, over the {MAX_BYTES_EACH / 2**20:.0f} MiB limit")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
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
