"""Hook hygiene: register PyTorch hooks so that every exit path removes them.

Everything in scorescope that touches a model's forward (capture, patching, locality enforcement,
forward-mode preparations) goes through :class:`HookSet`. It is a context manager in the spirit of
baukit's ``nethook``: leaving the ``with`` block — normally, by exception or by ``KeyboardInterrupt`` —
removes every hook it added, so a failed experiment never leaves a model silently modified.

>>> with HookSet() as hooks:
...     hooks.forward(model.mid_block, lambda m, args, out: print(out.shape))
...     model(x)
>>> assert not model.mid_block._forward_hooks
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from torch import nn
from torch.utils.hooks import RemovableHandle


class ForwardHook(Protocol):
    """``hook(module, args, output) -> output | None``; returning a value replaces the module's output."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any: ...


class ForwardPreHook(Protocol):
    """``hook(module, args, kwargs) -> (args, kwargs) | None``; returning a pair replaces the inputs."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...


class ProcessorConflictError(RuntimeError):
    """Two live edits tried to replace the attention processor of the same module."""


# Attention modules whose processor a live HookSet has replaced (module -> that HookSet). A second swap of the same
# module while the first is live is refused: undoing them out of order would reinstall the wrong processor.
_SWAPPED: weakref.WeakKeyDictionary[nn.Module, HookSet] = weakref.WeakKeyDictionary()


class _Undo:
    """A ``RemovableHandle``-like object that runs ``fn`` once when removed."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def remove(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class HookSet:
    """A set of hooks (and processor swaps) that are all undone together, newest first, on every exit path."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle | _Undo] = []

    def forward(self, module: nn.Module, hook: ForwardHook, *, prepend: bool = False) -> RemovableHandle:
        """Register ``hook`` to run after ``module.forward``."""
        handle = module.register_forward_hook(hook, prepend=prepend)
        self._handles.append(handle)
        return handle

    def pre(self, module: nn.Module, hook: ForwardPreHook, *, prepend: bool = False) -> RemovableHandle:
        """Register ``hook`` to run before ``module.forward``, with keyword arguments visible."""
        handle = module.register_forward_pre_hook(hook, prepend=prepend, with_kwargs=True)
        self._handles.append(handle)
        return handle

    def add_handle(self, handle: RemovableHandle) -> RemovableHandle:
        """Adopt a handle registered elsewhere so that it is removed with the rest."""
        self._handles.append(handle)
        return handle

    def swap_processor(self, module: nn.Module, processor: Any) -> Any:
        """Install ``processor`` on a diffusers ``Attention`` ``module``; the original is restored on removal.

        The exact original object is put back (not a copy). A module whose processor another live ``HookSet``
        has replaced is refused with :class:`ProcessorConflictError`.

        Returns:
            the processor that was installed before.
        """
        if not (hasattr(module, "set_processor") and hasattr(module, "processor")):
            raise TypeError(f"{type(module).__name__} has no attention processor to replace (not a diffusers Attention)")
        owner = _SWAPPED.get(module)
        if owner is not None and owner is not self:
            raise ProcessorConflictError(
                f"the attention processor of this {type(module).__name__} is already replaced by another active edit; "
                "apply both edits in one block, or finish the first before starting the second"
            )
        original = module.processor
        module.set_processor(processor)
        _SWAPPED[module] = self

        def restore() -> None:
            module.set_processor(original)
            if _SWAPPED.get(module) is self:
                del _SWAPPED[module]

        self._handles.append(_Undo(restore))
        return original

    def remove(self) -> None:
        """Remove every hook and undo every swap, newest first. Safe to call more than once."""
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward / pre-forward / backward hooks installed anywhere in ``model`` (0 when clean)."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks) + len(getattr(module, "_backward_pre_hooks", {}))
    return total


def iter_tensors(output: Any) -> Iterator[Any]:
    """Yield the tensors of a module output (a tensor, a tuple/list, or a diffusers ``BaseOutput``)."""
    import torch

    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from iter_tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from iter_tensors(item)


def primary_tensor(output: Any) -> Any:
    """The tensor a site refers to: the output itself, or the first tensor of a tuple / ``BaseOutput``.

    Diffusers blocks return 1-tuples (attention blocks inside the U-Net) or ``BaseOutput`` objects; the
    first tensor is the hidden state in every case that matters for interpretability.
    """
    for tensor in iter_tensors(output):
        return tensor
    raise TypeError(f"module output of type {type(output).__name__} holds no tensor")


def replace_primary(output: Any, new: Any) -> Any:
    """Return ``output`` with its primary tensor replaced by ``new`` (same container type)."""
    import torch

    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, dict):  # diffusers BaseOutput is an OrderedDict subclass
        key = next(k for k, v in output.items() if isinstance(v, torch.Tensor) or v is not None)
        out = output.__class__(**{**output, key: new})
        return out
    if isinstance(output, (tuple, list)):
        return type(output)([new, *output[1:]]) if not isinstance(output[0], (tuple, list)) else type(output)(
            [replace_primary(output[0], new), *output[1:]]
        )
    raise TypeError(f"cannot replace the tensor in an output of type {type(output).__name__}")


__all__ = [
    "ForwardHook",
    "ForwardPreHook",
    "HookSet",
    "ProcessorConflictError",
    "count_hooks",
    "iter_tensors",
    "primary_tensor",
    "replace_primary",
]

