"""The CLEVR world: renderer, datasets, training, detection and the length-generalisation metric.

Submodules (import what you need; nothing heavy is imported here):

* :mod:`interp.clevr.render` — procedural CLEVR-like scenes with exact ground truth;
* :mod:`interp.clevr.datasets` — seeded, streamed Exp1 / Exp2 / Exp3 / colour batches;
* :mod:`interp.models.clevr_colour` — the colour + location token encoder;
* :mod:`interp.models.coord_unet` — the global U-Net with pixel-coordinate input channels (Exp1, Exp2, colour);
* :mod:`interp.clevr.train` — the accelerate training loop (EMA, safetensors checkpoints, exact resume);
* :mod:`interp.clevr.detect` — object detector / counter for generated scenes;
* :mod:`interp.clevr.metrics` — Hungarian matching, count accuracy, recall / precision;
* :mod:`interp.clevr.evaluate` — the length-generalisation evaluation (k = 0…10);
* :mod:`interp.clevr.checkpoints` — shipped reference checkpoints (:func:`load_clevr`);
* :mod:`interp.clevr.cli` — ``scorescope clevr train | eval``.
"""

from __future__ import annotations


def load_clevr(name: str, **kwargs):  # noqa: ANN201 - re-export without importing diffusers eagerly
    """Load a shipped CLEVR reference checkpoint by name (see :func:`interp.clevr.checkpoints.load_clevr`)."""
    from interp.clevr.checkpoints import load_clevr as _load

    return _load(name, **kwargs)


__all__ = ["load_clevr"]
