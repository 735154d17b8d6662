"""The shipped CLEVR reference checkpoints: ``load_clevr("exp1")`` and friends.

Each checkpoint is a ``ClevrPipeline`` folder under ``interp/assets/clevr/<name>/`` with fp16 safetensors
weights (EMA), loaded back in float32. ``interp/assets/clevr/MANIFEST.json`` records, per name, the recipe,
steps, seed, wall time, machine, parameter count, file size and the length-generalisation table measured
on the shipped weights. Training and shipping them is the CLEVR world's job
(:mod:`interp.clevr.checkpoints`); loading them is the zoo's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "clevr"
MANIFEST = ASSETS / "MANIFEST.json"
SHIPPED = ("exp1", "exp2", "exp3", "colour")


def read_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    """The manifest as a dict (``{"models": {}}`` when absent)."""
    if not path.exists():
        return {"models": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"the checkpoint manifest {path} is not valid JSON ({err}); restore it from git") from None


def available(assets: Path = ASSETS) -> list[str]:
    """The shipped checkpoint names installed under ``assets`` (each a folder with ``model_index.json``)."""
    return [name for name in SHIPPED if (Path(assets) / name / "model_index.json").is_file()]


def load_clevr(name: str, *, device: str = "cpu", assets: Path = ASSETS):
    """Load shipped checkpoint ``name`` (``exp1``, ``exp2``, ``exp3``, ``colour``) as a float32 ClevrPipeline."""
    import torch

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


__all__ = ["ASSETS", "MANIFEST", "SHIPPED", "available", "load_clevr", "read_manifest"]
