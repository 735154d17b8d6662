"""Make a network differentiable in forward mode — without changing which function it computes.

``torch.func.jvp`` / ``jacfwd`` push tangents through every op. Two things in a diffusers model break that
(measured, see PITFALLS.md): the fused CPU ``scaled_dot_product_attention`` kernels have no forward-mode rule,
and GroupNorm's forward-mode rule fails on non-contiguous inputs. :func:`forward_mode_ready`

* selects PyTorch's *math* SDPA backend for the duration (the same attention function, computed with an
  explicit softmax that has a forward-mode rule), and
* adds a forward-pre hook on every ``nn.GroupNorm`` that makes its input contiguous (values unchanged).

It never swaps attention processors. An earlier version replaced every processor by diffusers'
``AttnProcessor``: that silently replaced a user's own processors (a probe then measured a different network)
and breaks transformer denoisers whose processors carry extra logic (SD3, Flux). The model's own processors
now run untouched, so the derivatives are those of the network the user has.

Restoration is exact on every exit path and in any order: the hooks belong to this context's
:class:`~interp.hooks.HookSet`; the SDPA backend selection is process-global in PyTorch, so it is
reference-counted here — the first context to enter saves the backends, the last one to leave restores them,
whatever order contexts close in (threads, generators, ``ExitStack``).

Reverse mode does not need the forward-mode rules, but *batched* reverse mode (``vmap`` over a pullback) does
meet the same wall on CUDA: the fused SDPA backward kernels (flash / memory-efficient) have no ``vmap`` batching
rule (pytorch/pytorch#117016, open; #176265 proposes one), so a batched VJP falls back to one kernel call per
cotangent row. :func:`derivative_ready_default` therefore turns the math backend on by default on CUDA; on the
CPU the fused backward, though also unbatched, measured no slower than math SDPA, so it stays off there.

:func:`frozen_parameters` switches ``requires_grad`` off for a model's parameters while a derivative probe builds
its graph: a Jacobian with respect to the *input* never needs parameter gradients, and a graph that tracks them
makes every batched pullback build (and throw away) a higher-order graph. ``requires_grad`` is restored on every
exit path.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from interp.hooks import HookSet

_LOCK = threading.Lock()
_ACTIVE = 0
_SAVED_BACKENDS: list[Any] | None = None


def _contiguous_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args and hasattr(args[0], "contiguous"):
        return (args[0].contiguous(), *args[1:]), kwargs
    return None


def _enter_math_sdpa() -> None:
    global _ACTIVE, _SAVED_BACKENDS
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, _sdpa_kernel

    with _LOCK:
        if _ACTIVE == 0:
            _SAVED_BACKENDS = _cur_sdpa_kernel_backends()
            _sdpa_kernel([SDPBackend.MATH])
        _ACTIVE += 1


def _exit_math_sdpa() -> None:
    global _ACTIVE, _SAVED_BACKENDS
    from torch.nn.attention import _sdpa_kernel

    with _LOCK:
        _ACTIVE -= 1
        if _ACTIVE == 0 and _SAVED_BACKENDS is not None:
            _sdpa_kernel(_SAVED_BACKENDS)
            _SAVED_BACKENDS = None


def sdpa_backends() -> list[Any]:
    """The scaled-dot-product-attention backends PyTorch may use now (for tests: restored exactly on exit)."""
    from torch.nn.attention import _cur_sdpa_kernel_backends

    return list(_cur_sdpa_kernel_backends())


@contextlib.contextmanager
def forward_mode_ready(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` supports ``torch.func.jvp`` / ``jacfwd``; everything is restored on exit.

    Args:
        model: any module (a diffusers U-Net, a hand-made one; modules without attention or GroupNorm pass
            through untouched). Its attention processors are never replaced.

    Yields:
        the same ``model``, computing the same function (outputs equal up to the rounding of the math SDPA
        backend versus the fused one).
    """
    with HookSet() as hooks:
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                hooks.pre(module, _contiguous_pre_hook)
        _enter_math_sdpa()
        try:
            yield model
        finally:
            _exit_math_sdpa()


@contextlib.contextmanager
def frozen_parameters(*modules: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Within the block, no parameter of ``modules`` requires grad; each one that did is switched back on exit.

    Only parameters that required grad on entry are touched (a frozen layer stays frozen), so nested blocks and
    shared parameters restore exactly. Restoration runs on every exit path (exceptions, generators closed early).

    Yields:
        the parameters that were switched off (for tests).
    """
    seen: set[int] = set()
    switched: list[nn.Parameter] = []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                switched.append(p)
    try:
        for p in switched:
            p.requires_grad_(False)
        yield switched
    finally:
        for p in switched:
            p.requires_grad_(True)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def derivative_ready_default(device: torch.device | str) -> bool:
    """Whether the probes differentiate inside :func:`forward_mode_ready` by default on ``device``.

    ``True`` on CUDA (the fused SDPA backward has no ``vmap`` batching rule there, see the module docstring),
    ``False`` elsewhere (on the CPU the fused backward measured no slower; unmeasured on CUDA, no GPU here).
    """
    return torch.device(device).type == "cuda"


def forward_chunk_default(device: torch.device | str) -> int:
    """Forward-mode tangents pushed together by default: 8 on the CPU (batching buys little on two cores,
    PITFALLS.md), 64 on CUDA (wide batches are what a GPU needs; unmeasured here, no GPU)."""
    return 64 if torch.device(device).type == "cuda" else 8


__all__ = ["derivative_ready_default", "forward_chunk_default", "forward_mode_ready", "frozen_parameters",
           "model_device", "sdpa_backends"]
