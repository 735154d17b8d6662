"""Models by name: every CLI command and notebook resolves ``--model NAME`` here.

Names:
* ``tiny-clevr`` — a randomly initialised tiny CLEVR pipeline (tests, demos without checkpoints);
* ``tiny-sdxl`` — the tiny random SDXL pipeline;
* ``exp1`` / ``exp2`` / ``exp3`` / ``colour`` — the shipped CLEVR reference checkpoints
  (:func:`interp.clevr.checkpoints.load_clevr`);
* a path to a folder saved with ``ClevrPipeline.save_pretrained`` or an SDXL pipeline folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interp.denoiser import Denoiser

SHIPPED_CLEVR = ("exp1", "exp2", "exp3", "colour")


@dataclass
class LoadedModel:
    """A pipeline-like object plus the :class:`Denoiser` over its network."""

    name: str
    family: str  # "clevr" | "sdxl"
    pipeline: Any
    denoiser: Denoiser


def load_model(name: str, *, seed: int = 0, device: str = "cpu") -> LoadedModel:
    """Resolve a model name or folder (see the module docstring)."""
    from interp.models.clevr import ClevrPipeline, clevr_pipeline
    from interp.models.sdxl import sdxl_denoiser, tiny_sdxl

    if name == "tiny-clevr":
        pipe = clevr_pipeline("tiny", seed=seed).to(device)
        return LoadedModel(name, "clevr", pipe, pipe.denoiser(name=name))
    if name == "tiny-sdxl":
        pipe = tiny_sdxl(seed).to(device)
        return LoadedModel(name, "sdxl", pipe, sdxl_denoiser(pipe, name=name))
    if name in SHIPPED_CLEVR:
        from interp.clevr.checkpoints import load_clevr

        pipe = load_clevr(name).to(device)
        return LoadedModel(name, "clevr", pipe, pipe.denoiser(name=name))
    path = Path(name)
    if path.is_dir() and (path / "model_index.json").exists():
        index = (path / "model_index.json").read_text()
        if "ClevrPipeline" in index:
            pipe = ClevrPipeline.from_pretrained(path).to(device)
            return LoadedModel(path.name, "clevr", pipe, pipe.denoiser(name=path.name))
        from interp.models.sdxl import load_sdxl

        pipe = load_sdxl(str(path), device=device, dtype=None)
        return LoadedModel(path.name, "sdxl", pipe, sdxl_denoiser(pipe, name=path.name))
    known = ", ".join(("tiny-clevr", "tiny-sdxl", *SHIPPED_CLEVR))
    raise ValueError(f"unknown model {name!r}: use one of {known}, or a folder saved with save_pretrained")
