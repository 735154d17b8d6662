"""Training and evaluation data for the CLEVR experiments, streamed and seeded by step.

Every batch is a pure function of ``(seed, index)``: :meth:`ClevrStream.batch` seeds a fresh numpy
generator with ``[seed, index]`` and renders. There is no iterator state to checkpoint, which is what makes
an interrupted training run resume *bit-identically* (the trainer just asks for batch ``step`` again).

Recipes (SCIENCE.md §2):

* ``exp1`` — 1–3 objects; the conditioner lists **every** object location.
* ``exp2`` — the same images (same seeds → same scenes); the conditioner lists **one** randomly chosen location.
* ``exp3`` — exp2's data (exp3 differs in the architecture, not the data).
* ``colour`` — 1–3 objects; each conditioner is one object's location **and colour** (for the feature-space
  colour-composition work).

A batch is a dict of tensors: ``images (B, 3, H, W)`` in [-1, 1]; ``locations (B, K, 2)`` normalised;
``mask (B, K)`` bool (True for a real conditioner); ``colours (B, K)`` int64; ``counts (B,)`` objects drawn.
``K = 3`` for exp1/colour and 1 for exp2/exp3. Conditioner order is random (a set, not a list).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from interp.clevr.render import render, random_scene

RECIPE_DATA = {
    # recipe: (min objects, max objects, conditioners listed: "all" | "one", conditions on colour)
    "exp1": (1, 3, "all", False),
    "exp2": (1, 3, "one", False),
    "exp3": (1, 3, "one", False),
    "colour": (1, 3, "all", True),
}


@dataclass(frozen=True)
class ClevrStream:
    """An endless, seeded stream of rendered training batches.

    Args:
        recipe: one of :data:`RECIPE_DATA`.
        batch_size: scenes per batch.
        size: image side in pixels (32 on CPU, 64 on GPU).
        seed: the stream's seed; batch ``i`` depends only on ``(seed, i)``.
    """

    recipe: str
    batch_size: int = 64
    size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.recipe not in RECIPE_DATA:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {sorted(RECIPE_DATA)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {self.size}")
        # numpy's SeedSequence refuses negative entries, which would only surface at the first batch.
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def max_conditioners(self) -> int:
        lo, hi, listed, _ = RECIPE_DATA[self.recipe]
        return hi if listed == "all" else 1

    def batch(self, index: int) -> dict[str, Tensor]:
        """Batch number ``index`` (see the module docstring for the keys and shapes)."""
        lo, hi, listed, _ = RECIPE_DATA[self.recipe]
        # exp1/exp2/exp3 share scene seeds so their images are identical; the listing choice uses a separate stream.
        rng = np.random.default_rng([self.seed, index])
        counts = rng.integers(lo, hi + 1, size=self.batch_size)
        scene = random_scene(rng, counts)
        img = render(scene, self.size).to_model_range()
        pick = np.random.default_rng([self.seed, index, 1])
        B, K = scene.valid.shape
        if listed == "all":
            # shuffle each scene's objects so the conditioner order carries no information
            perm = np.argsort(np.where(scene.valid, pick.random((B, K)), 2.0), axis=1)
            loc = np.take_along_axis(scene.positions, perm[..., None], 1)
            col = np.take_along_axis(scene.colours, perm, 1)
            mask = np.take_along_axis(scene.valid, perm, 1)
        else:
            j = (pick.random(B) * counts).astype(np.int64)
            loc = scene.positions[np.arange(B), j][:, None]
            col = scene.colours[np.arange(B), j][:, None]
            mask = np.ones((B, 1), bool)
        return {
            "images": torch.from_numpy(np.ascontiguousarray(img)),
            "locations": torch.from_numpy(np.ascontiguousarray(loc, dtype=np.float32)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "colours": torch.from_numpy(np.ascontiguousarray(col, dtype=np.int64)),
            "counts": torch.from_numpy(counts.astype(np.int64)),
        }
