"""Renamed keyword arguments: the old name keeps working for one release, with a warning that shows the new one.

>>> @renamed_kwargs(output="quantity")
... def probe(den, cond, *, quantity="prediction"): ...
>>> probe(den, cond, output="score")   # DeprecationWarning: pass quantity= instead of output=

Passing both names is an error (they would disagree silently otherwise).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_kwargs(**old_to_new: str) -> Callable[[F], F]:
    """Decorate a function whose keyword arguments ``old`` were renamed ``new`` (``old="new"`` pairs)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old}= and {new}=; pass only {new}= ({old}= is its old name)")
                    warnings.warn(f"{fn.__name__}({old}=...) is deprecated: pass {new}=...", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        wrapper.__renamed_kwargs__ = dict(old_to_new)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


__all__ = ["renamed_kwargs"]
