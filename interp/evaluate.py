"""The function a probe differentiates or an intervention measures: one branch's prediction, or its score.

``evaluate(den, x_t, timestep, cond, branch=..., quantity=...)`` is ``den.predict`` (``quantity="prediction"``:
the network's raw ε / v / x₀ prediction) or ``den.score`` (``quantity="score"``: ∇ log p_t). Both verbs call
this one function, so the measured quantity means the same thing in every probe and every intervention.

Vocabulary: *quantity* is which form of the denoiser's output is measured; *output* always means what a
module returns (``Site(io="output")``, the sweep's ``"output"`` site: the denoiser's own output).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from interp.denoiser import Branch, Denoiser

Quantity = Literal["prediction", "score"]


def evaluate(den: Denoiser, x_t: Tensor, timestep: Tensor, cond: Any, *, branch: Branch = "cond",
             quantity: Quantity = "prediction") -> Tensor:
    """The measured function at inputs ``x_t (B, C, H, W)``: ``(B, C, H, W)`` prediction or score of ``branch``."""
    if quantity == "score":
        return den.score(x_t, timestep, cond, branch=branch)
    if quantity != "prediction":
        raise ValueError(f"quantity must be 'prediction' or 'score', got {quantity!r}")
    return den.predict(x_t, timestep, cond, branch=branch)


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (fp32 accumulation for fp16 / bf16 models)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


__all__ = ["Branch", "Quantity", "accumulation_dtype", "evaluate"]
