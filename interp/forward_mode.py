"""Make a diffusers network differentiable in forward mode, and put it back afterwards.

``torch.func.jvp`` / ``jacfwd`` push tangents through every op. Two things in diffusers break that
(measured, see PITFALLS.md): the fused ``scaled_dot_product_attention`` processors (no forward-mode
rule for the fused CPU kernel) and GroupNorm on non-contiguous inputs. :func:`forward_mode_ready`
swaps every ``Attention`` module's processor for the plain ``AttnProcessor()`` (same maths, explicit
softmax) and adds a forward-pre hook that makes GroupNorm inputs contiguous. On exit — normally or by
exception — the original processors are restored and the hooks removed (through
:class:`interp.hooks.HookSet`), so the model is exactly as it was.

Reverse mode does not need it: the fused kernel's backward has no ``vmap`` batching rule and falls back to
a per-row loop, yet on CPU it was no slower than the plain processor (bench/bench_probes.py), so the
Jacobian probes only swap processors on request (``derivative_ready=True``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from interp.hooks import HookSet


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    out = []
    for module in model.modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            out.append((module, module.processor))
    return out


def _contiguous_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args and hasattr(args[0], "contiguous"):
        return (args[0].contiguous(), *args[1:]), kwargs
    return None


@contextlib.contextmanager
def forward_mode_ready(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` supports ``torch.func.jvp`` / ``jacfwd``; restored on exit.

    Args:
        model: any module (a diffusers U-Net, or a hand-made one, which passes through untouched).

    Yields:
        the same ``model``.
    """
    from diffusers.models.attention_processor import AttnProcessor

    saved = _attention_modules(model)
    hooks = HookSet()
    try:
        for module, _ in saved:
            module.set_processor(AttnProcessor())
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                hooks.pre(module, _contiguous_pre_hook)
        yield model
    finally:
        hooks.remove()
        for module, proc in saved:
            module.set_processor(proc)
