"""Models by name: the one place a ``--model NAME`` becomes a pipeline and a :class:`Denoiser`.

Every CLI command, notebook and sweep resolves names here (:func:`load_model`):

* ``tiny-clevr`` — a randomly initialised tiny CLEVR pipeline (tests, demos without checkpoints);
* ``tiny-sdxl`` — the tiny random SDXL pipeline; ``tiny-sd15``, ``tiny-sd2``, ``tiny-pixart``, ``tiny-dit``,
  ``tiny-sd3``, ``tiny-flux`` — the tiny random pipelines of the other families (:func:`interp.models.tiny`);
* ``exp1`` / ``exp2`` / ``exp3`` / ``colour`` — the shipped CLEVR reference checkpoints
  (:func:`interp.models.shipped.load_clevr`);
* a folder saved with ``save_pretrained``: a ``ClevrPipeline``, or a pipeline of a supported family, recognised by
  its ``model_index.json`` ``_class_name`` (SD1.5/2, SDXL, PixArt, DiT, SD3, Flux); an unknown class is refused;
* any other folder a *folder loader* recognises. Folder loaders are plugins declared under the
  ``scorescope.models`` entry-point group: ``loader(path, device) -> pipeline | None``. The CLEVR world
  declares one for training-run folders (``latest.json``; their EMA weights), so the zoo resolves runs
  without importing the world.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from interp.denoiser import Denoiser
from interp.models.shipped import SHIPPED

TINY = ("tiny-clevr", "tiny-sdxl", "tiny-sd15", "tiny-sd2", "tiny-pixart", "tiny-dit", "tiny-sd3", "tiny-flux")


#: The default scene of a CLEVR model loaded by name *(ours)*: three well-separated objects, normalised (x, y).
DEFAULT_LOCATIONS = ((0.25, 0.3), (0.72, 0.25), (0.5, 0.75))
#: The default phrases of a text-conditioned model loaded by name.
DEFAULT_PHRASES = ("a red cube", "a blue sphere")


@dataclass
class LoadedModel:
    """A pipeline-like object plus the :class:`Denoiser` over its network."""

    name: str
    family: str  # "clevr" | "sdxl" | "sd" | "pixart" | "dit" | "sd3" | "flux"
    pipeline: Any
    denoiser: Denoiser

    def conditioning(self, locations: Any = None, phrases: Any = None) -> Any:
        """The conditioning a command builds for this model: CLEVR objects at ``locations`` (default
        :data:`DEFAULT_LOCATIONS`), a text family's ``phrases`` (default :data:`DEFAULT_PHRASES`, one conditioner
        each, :func:`interp.models.prompt_conditioning`), or DiT's class (``phrases``: one class name or id,
        default 0)."""
        if self.family == "clevr":
            return self.pipeline.conditioning([list(p) for p in (locations or DEFAULT_LOCATIONS)])
        if locations:
            raise ValueError(f"locations are for CLEVR models; {self.name!r} is a {self.family} model (give phrases)")
        from interp.models.prompts import class_conditioning, prompt_conditioning

        if self.family == "dit":
            if phrases and len(phrases) != 1:
                raise ValueError(f"a DiT model takes one class (a name or an id), got {list(phrases)}")
            label = phrases[0] if phrases else 0
            return class_conditioning(self.pipeline, int(label) if str(label).isdigit() else label)
        return prompt_conditioning(self.pipeline, list(phrases or DEFAULT_PHRASES))


def known_names() -> tuple[str, ...]:
    """Every model name :func:`load_model` accepts besides folders."""
    return (*TINY, *SHIPPED)


def _clevr(name: str, pipe: Any) -> LoadedModel:
    pipe._scorescope_name = name
    return LoadedModel(name, "clevr", pipe, pipe.denoiser(name=name))


def _from_folder(path: Path, device: str) -> LoadedModel | None:
    from interp.models.clevr import ClevrPipeline

    if (path / "model_index.json").is_file():
        import json

        try:
            class_name = json.loads((path / "model_index.json").read_text()).get("_class_name")
        except json.JSONDecodeError as err:
            raise ValueError(f"{path / 'model_index.json'} is not valid JSON: {err}") from None
        if class_name == "ClevrPipeline":
            import torch

            return _clevr(path.name, ClevrPipeline.from_pretrained(str(path), dtype=torch.float32).to(device))
        if class_name == "StableDiffusionXLPipeline":
            from interp.models.sdxl import load_sdxl, sdxl_denoiser

            pipe = load_sdxl(str(path), device=device, dtype=None)
            return LoadedModel(path.name, "sdxl", pipe, sdxl_denoiser(pipe, name=path.name))
        from interp.models.prompts import PIPELINE_FAMILIES

        if class_name not in PIPELINE_FAMILIES:
            raise ValueError(
                f"{path} holds a {class_name} pipeline, which scorescope does not support; supported: "
                f"ClevrPipeline, {', '.join(sorted(PIPELINE_FAMILIES))}"
            )
        import diffusers

        from interp.models.alignment import realign_pipeline_

        pipe = realign_pipeline_(getattr(diffusers, class_name).from_pretrained(str(path)).to(device))
        return LoadedModel(path.name, PIPELINE_FAMILIES[class_name], pipe, Denoiser(pipe, name=path.name))
    for ep in entry_points(group="scorescope.models"):
        pipe = ep.load()(path, device)
        if pipe is not None:
            return _clevr(path.name, pipe) if isinstance(pipe, ClevrPipeline) else None
    return None


def load_model(name: str | Path, *, seed: int = 0, device: str = "cpu") -> LoadedModel:
    """Resolve a model name or folder (see the module docstring).

    Args:
        name: a known name (:func:`known_names`) or a folder.
        seed: initialises the random ``tiny-*`` models (ignored for trained weights).
        device: where to put the model.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    from interp.models.clevr import clevr_pipeline
    from interp.models.sdxl import sdxl_denoiser, tiny_sdxl

    key = str(name)
    if key == "tiny-clevr":
        return _clevr(key, clevr_pipeline("tiny", seed=seed).to(device))
    if key == "tiny-sdxl":
        pipe = tiny_sdxl(seed).to(device)
        return LoadedModel(key, "sdxl", pipe, sdxl_denoiser(pipe, name=key))
    if key in TINY:
        from interp.models.prompts import pipeline_family
        from interp.models.tiny import tiny

        pipe = tiny(key.removeprefix("tiny-"), seed).to(device)
        return LoadedModel(key, pipeline_family(pipe), pipe, Denoiser(pipe, name=key))
    if key in SHIPPED:
        from interp.models.shipped import load_clevr

        return _clevr(key, load_clevr(key, device=device))
    path = Path(key)
    if path.is_dir():
        loaded = _from_folder(path, device)
        if loaded is not None:
            return loaded
        raise ValueError(
            f"{path} is a folder but holds no model: expected a pipeline saved with save_pretrained "
            "(model_index.json) or a CLEVR training run (latest.json)"
        )
    raise ValueError(
        f"unknown model {key!r}: use one of {', '.join(known_names())}, or a folder saved with save_pretrained "
        "or written by `scorescope clevr train`"
    )


__all__ = ["LoadedModel", "known_names", "load_model"]
