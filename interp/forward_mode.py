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

Reverse mode does not need any of this (the fused kernels have backward rules); the Jacobian probes enter
it only on request (``derivative_ready=True``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

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


__all__ = ["forward_mode_ready", "sdpa_backends"]
