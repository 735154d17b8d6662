"""The function a probe differentiates or an intervention measures: one branch's prediction, or its score.

``evaluate(den, x_t, t, cond, branch=..., output=...)`` is ``den.predict`` (``output="prediction"``: the
network's raw ε / v / x₀ output) or ``den.score`` (``output="score"``: ∇ log p_t). Both verbs call this one
function, so "the output" means the same thing in every probe and every intervention.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from interp.denoiser import Branch, Denoiser

Output = Literal["prediction", "score"]


def evaluate(den: Denoiser, x_t: Tensor, t: Tensor, cond: Any, *, branch: Branch = "cond", output: Output = "prediction") -> Tensor:
    """The probed function: the network's prediction (or the score) for one branch, ``(B, C, H, W)``."""
    if output == "score":
        return den.score(x_t, t, cond, branch=branch)
    if output != "prediction":
        raise ValueError(f"output must be 'prediction' or 'score', got {output!r}")
    return den.predict(x_t, t, cond, branch=branch)


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (fp32 accumulation for fp16 / bf16 models)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


__all__ = ["Branch", "Output", "accumulation_dtype", "evaluate"]
