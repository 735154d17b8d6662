"""Activation stores: where captured tensors go — memory, or safetensors shards streamed to disk.

A capture of every ``attn2`` output of SDXL over 30 steps is tens of gigabytes; it cannot live in RAM.
:class:`ShardedStore` buffers tensors up to ``shard_bytes`` and then writes one safetensors shard and its
small JSON sidecar, each atomically (temporary file + ``os.replace``), so memory stays flat however long
the run, and a crash leaves every flushed shard readable. :class:`MemoryStore` is the
default for small captures. Both answer the same questions: ``store[key]``, ``store.get(site, step,
branch)``, ``store.stack(site)``, ``store.frame()``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

INDEX_NAME = "index.json"
FORMAT_VERSION = 1


@dataclass(frozen=True, order=True)
class ActivationKey:
    """Identifies one captured tensor.

    Attributes:
        site: module path.
        step: denoising step, ``-1`` when no sampling loop announced one.
        branch: CFG branch (``"cond"``, ``"uncond"``).
        call: index of the U-Net call within the capture (disambiguates calls without a step).
    """

    site: str
    step: int
    branch: str
    call: int

    def encode(self) -> str:
        return f"{self.site}@{self.step}@{self.branch}@{self.call}"

    @staticmethod
    def decode(name: str) -> ActivationKey:
        site, step, branch, call = name.rsplit("@", 3)
        return ActivationKey(site, int(step), branch, int(call))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ActivationStore:
    """Interface shared by the stores (a mapping from :class:`ActivationKey` to CPU tensors)."""

    metadata: dict[str, Any]

    def put(self, key: ActivationKey, tensor: Tensor) -> None:
        raise NotImplementedError

    def __getitem__(self, key: ActivationKey) -> Tensor:
        raise NotImplementedError

    def keys(self) -> list[ActivationKey]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes held (memory) or written and buffered (disk)."""
        raise NotImplementedError

    @property
    def resident_bytes(self) -> int:
        """Bytes currently held in RAM."""
        return self.nbytes

    def flush(self) -> None:
        """Persist buffered tensors (no-op in memory)."""

    def close(self) -> None:
        self.flush()

    # ----------------------------------------------------------- convenience
    def __contains__(self, key: object) -> bool:
        return key in set(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[ActivationKey]:
        return iter(self.keys())

    def sites(self) -> list[str]:
        return sorted({k.site for k in self.keys()})

    def find(self, site: str | None = None, step: int | None = None, branch: str | None = None) -> list[ActivationKey]:
        """Keys matching the given fields (``None`` matches anything), sorted by call."""
        return sorted(
            (k for k in self.keys() if (site is None or k.site == site) and (step is None or k.step == step)
             and (branch is None or k.branch == branch)),
            key=lambda k: (k.call, k.site, k.branch),
        )

    def get(self, site: str, step: int | None = None, branch: str = "cond") -> Tensor:
        """The one tensor captured at ``site`` (and ``step``, ``branch``); raises if none or several match."""
        hits = self.find(site, step, branch)
        if not hits:
            have = sorted({(k.site, k.step, k.branch) for k in self.keys()})[:10]
            raise KeyError(f"nothing captured at site={site!r} step={step} branch={branch!r}; captured e.g. {have}")
        if len(hits) > 1:
            raise KeyError(
                f"{len(hits)} tensors captured at site={site!r} step={step} branch={branch!r}; "
                "pass step= or use stack()/find()"
            )
        return self[hits[0]]

    def stack(self, site: str, branch: str = "cond") -> Tensor:
        """All calls at ``site`` on ``branch`` stacked in call order: ``(n_calls, B, ...)``."""
        hits = self.find(site, None, branch)
        if not hits:
            raise KeyError(f"nothing captured at site={site!r} on branch {branch!r}")
        return torch.stack([self[k] for k in hits])

    def frame(self):
        """Tidy ``pandas.DataFrame``: one row per captured tensor (site, step, branch, call, shape, dtype, bytes)."""
        import pandas as pd

        rows = []
        for k in self.keys():
            shape, dtype, nbytes = self.describe(k)
            rows.append({**asdict(k), "shape": shape, "dtype": dtype, "bytes": nbytes})
        return pd.DataFrame(rows, columns=["site", "step", "branch", "call", "shape", "dtype", "bytes"])

    def describe(self, key: ActivationKey) -> tuple[tuple[int, ...], str, int]:
        t = self[key]
        return tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size()


class MemoryStore(ActivationStore):
    """Captured tensors kept in a dict in RAM."""

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        self._data: dict[ActivationKey, Tensor] = {}
        self._bytes = 0
        self.metadata = dict(metadata or {})

    def put(self, key: ActivationKey, tensor: Tensor) -> None:
        old = self._data.get(key)
        if old is not None:
            self._bytes -= old.numel() * old.element_size()
        self._data[key] = tensor
        self._bytes += tensor.numel() * tensor.element_size()

    def __getitem__(self, key: ActivationKey) -> Tensor:
        return self._data[key]

    def keys(self) -> list[ActivationKey]:
        return list(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    @property
    def nbytes(self) -> int:
        return self._bytes

    def items(self) -> Iterator[tuple[ActivationKey, Tensor]]:
        return iter(self._data.items())

    def save(self, root: str | Path, shard_bytes: int = 256 * 2**20) -> ShardedStore:
        """Write everything to a sharded safetensors folder and return it opened for reading."""
        disk = ShardedStore(root, shard_bytes=shard_bytes, metadata=self.metadata)
        for k, t in self._data.items():
            disk.put(k, t)
        disk.close()
        return ShardedStore.open(root)


class ShardedStore(ActivationStore):
    """Tensors streamed to ``root/shard-00000.safetensors, ...`` with an atomic ``index.json``.

    Args:
        root: folder (created; must not already hold a store unless ``overwrite``).
        shard_bytes: buffer size that triggers a shard write — the store's RAM ceiling.
        metadata: JSON-serialisable metadata saved in the index (model, sites, seed, version...).
        overwrite: replace an existing store in ``root``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        shard_bytes: int = 64 * 2**20,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / INDEX_NAME).exists() and not overwrite:
            raise FileExistsError(
                f"{self.root} already holds an activation store; pick a new folder, pass overwrite=True, "
                "or open it with ShardedStore.open()"
            )
        if overwrite:
            for f in [*self.root.glob("shard-*.safetensors"), *self.root.glob("shard-*.json")]:
                f.unlink()
        self.shard_bytes = int(shard_bytes)
        self.metadata = dict(metadata or {})
        self._readonly = False
        self._buffer: dict[ActivationKey, Tensor] = {}
        self._buffer_bytes = 0
        self._written_bytes = 0
        self._where: dict[ActivationKey, str] = {}  # key -> shard file name
        self._described: dict[ActivationKey, tuple[tuple[int, ...], str, int]] = {}
        self._n_shards = 0
        self._write_index()

    @classmethod
    def open(cls, root: str | Path) -> ShardedStore:
        """Open a store written earlier, read-only (also one whose writer crashed: flushed shards are intact)."""
        root = Path(root)
        index_path = root / INDEX_NAME
        if not index_path.exists():
            raise FileNotFoundError(f"{root} holds no activation store (no {INDEX_NAME})")
        index = json.loads(index_path.read_text())
        self = cls.__new__(cls)
        self.root = root
        self.shard_bytes = index.get("shard_bytes", 0)
        self.metadata = index.get("metadata", {})
        self._readonly = True
        self._buffer, self._buffer_bytes = {}, 0
        self._where, self._described = {}, {}
        sidecars = sorted(root.glob("shard-*.json"))
        for sidecar in sidecars:
            shard = sidecar.with_suffix(".safetensors").name
            for name, entry in json.loads(sidecar.read_text()).items():
                key = ActivationKey.decode(name)
                self._where[key] = shard
                self._described[key] = (tuple(entry["shape"]), entry["dtype"], entry["bytes"])
        self._written_bytes = sum(d[2] for d in self._described.values())
        self._n_shards = len(sidecars)
        return self

    # ----------------------------------------------------------------- writing
    def put(self, key: ActivationKey, tensor: Tensor) -> None:
        if self._readonly:
            raise PermissionError(f"{self.root} was opened read-only")
        if key in self._where or key in self._buffer:
            raise KeyError(f"{key} was already captured into {self.root}")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self._buffer[key] = tensor
        self._buffer_bytes += nbytes
        self._described[key] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), nbytes)
        if self._buffer_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        from safetensors.torch import save

        name = f"shard-{self._n_shards:05d}"
        blob = save({k.encode(): t for k, t in self._buffer.items()}, metadata={"format": "scorescope-activations"})
        atomic_write_bytes(self.root / f"{name}.safetensors", blob)
        # Each shard gets its own small index, written after the shard itself: the store's cost of a flush is
        # O(shard), not O(everything so far), and a reader never sees an index entry without its tensor.
        sidecar = {
            k.encode(): {"shape": list(t.shape), "dtype": self._described[k][1], "bytes": self._described[k][2]}
            for k, t in self._buffer.items()
        }
        atomic_write_bytes(self.root / f"{name}.json", json.dumps(sidecar).encode())
        for k in self._buffer:
            self._where[k] = f"{name}.safetensors"
        self._written_bytes += self._buffer_bytes
        self._buffer.clear()
        self._buffer_bytes = 0
        self._n_shards += 1

    def _write_index(self, *, closed: bool = False) -> None:
        index = {
            "format_version": FORMAT_VERSION,
            "shard_bytes": self.shard_bytes,
            "metadata": self.metadata,
            "closed": closed,
            "n_shards": self._n_shards,
            "n_tensors": len(self._where),
            "layout": "shard-NNNNN.safetensors holds the tensors; shard-NNNNN.json lists them (key: site@step@branch@call)",
        }
        atomic_write_bytes(self.root / INDEX_NAME, json.dumps(index, indent=1, default=str).encode())

    def close(self) -> None:
        if not self._readonly:
            self.flush()
            self._write_index(closed=True)

    # ----------------------------------------------------------------- reading
    def __getitem__(self, key: ActivationKey) -> Tensor:
        if key in self._buffer:
            return self._buffer[key]
        if key not in self._where:
            raise KeyError(key)
        from safetensors import safe_open

        with safe_open(str(self.root / self._where[key]), framework="pt") as fh:
            return fh.get_tensor(key.encode())

    def keys(self) -> list[ActivationKey]:
        return [*self._where, *self._buffer]

    def __contains__(self, key: object) -> bool:
        return key in self._where or key in self._buffer

    def describe(self, key: ActivationKey) -> tuple[tuple[int, ...], str, int]:
        return self._described[key]

    @property
    def nbytes(self) -> int:
        return self._written_bytes + self._buffer_bytes

    @property
    def resident_bytes(self) -> int:
        return self._buffer_bytes


def open_store(root: str | Path) -> ShardedStore:
    """Open a capture streamed to disk earlier."""
    return ShardedStore.open(root)
