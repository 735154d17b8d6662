"""Result metadata: what produced a number, carried all the way into exported files."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any


@functools.cache
def version() -> str:
    """The installed scorescope version (read once per process: every result and store records it)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("scorescope")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def config_hash(config: Mapping[str, Any] | None) -> str:
    """A short, stable hash of a model config (keys starting with ``_`` ignored)."""
    if not config:
        return "none"
    clean = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    blob = json.dumps(clean, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
