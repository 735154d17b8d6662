"""The CLEVR world: renderer, datasets, training, detection and the length-generalisation metric.

Submodules (import what you need; nothing heavy is imported here):

* :mod:`interp.clevr.render` — procedural CLEVR-like scenes with exact ground truth;
* :mod:`interp.clevr.datasets` — seeded, streamed Exp1 / Exp2 / Exp3 / colour batches;
* :mod:`interp.clevr.train` — the accelerate training loop (EMA, safetensors checkpoints, exact resume);
* :mod:`interp.clevr.detect` — object detector / counter for generated scenes;
* :mod:`interp.clevr.metrics` — Hungarian matching, count accuracy, recall / precision;
* :mod:`interp.clevr.evaluate` — the length-generalisation evaluation (k = 0…10);
* :mod:`interp.clevr.checkpoints` — shipping reference checkpoints into the package's assets;
* :mod:`interp.clevr.cli` — ``scorescope clevr train | eval | compare | render``.

The models themselves live in the zoo (:mod:`interp.models`: the colour encoder, the coordinate U-Net, the
local Exp3 U-Net, and :func:`interp.models.shipped.load_clevr` for the shipped checkpoints); the world uses
the zoo, never the other way round.
"""

from __future__ import annotations


def load_clevr(name: str, **kwargs):  # noqa: ANN201 - re-export without importing diffusers eagerly
    """Load a shipped CLEVR reference checkpoint by name (see :func:`interp.models.shipped.load_clevr`)."""
    from interp.models.shipped import load_clevr as _load

    return _load(name, **kwargs)


__all__ = ["load_clevr"]
