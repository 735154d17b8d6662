"""Activation stores: where captured tensors go — memory, or safetensors shards streamed to disk.

A capture of every ``attn2`` output of SDXL over 30 steps is tens of gigabytes; it cannot live in RAM.
:class:`ShardedStore` buffers tensors up to ``shard_bytes`` and then writes one safetensors shard and its
small JSON sidecar, each atomically (:func:`interp.io.atomic_write`), so memory stays flat however long
the run, and a crash leaves every flushed shard readable. :class:`MemoryStore` is the
default for small captures. Both answer the same questions: ``store[key]``, ``store.get(site, step,
branch)``, ``store.stack(site)``, ``store.frame()``.

A store says whether it is whole: ``store.complete`` is ``False`` for a capture that ended by an exception
(``store.aborted`` holds ``"<ExceptionType>: message"``) or, on disk, for a writer that never closed its
store (crashed, or still running). :meth:`ShardedStore.open` refuses a store that claims to be closed but
lacks shards or sidecars, naming the missing files.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.io import atomic_write, atomic_write_json

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
#: The only files a ShardedStore writes besides its index (and the only ones ``overwrite=True`` deletes).
_SHARD_FILE = re.compile(r"shard-\d{5}\.(safetensors|json)")


class DamagedStoreError(ValueError):
    """A store on disk that cannot be read as written: bad JSON, unknown format, or missing shards/sidecars."""


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DamagedStoreError(f"{path} ({what}) is not valid JSON: {err}; the store is damaged") from None
    except UnicodeDecodeError as err:
        raise DamagedStoreError(f"{path} ({what}) is not text: {err}; the store is damaged") from None


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


class ActivationStore:
    """Interface shared by the stores (a mapping from :class:`ActivationKey` to CPU tensors)."""

    metadata: dict[str, Any]
    #: ``"<ExceptionType>: message"`` of the exception that ended the capture writing this store, else ``None``.
    aborted: str | None = None

    @property
    def complete(self) -> bool:
        """Whether the store holds a whole capture (not aborted by an exception, on disk: closed by its writer)."""
        return self.aborted is None

    def mark_aborted(self, reason: str) -> None:
        """Record that the capture writing this store ended by an exception (kept when the store is closed/saved)."""
        self.aborted = str(reason)

    def put(self, key: ActivationKey, tensor: Tensor) -> None:
        """Add one tensor; a key already present is refused (``KeyError``), never overwritten."""
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


class IncompleteStoreWarning(UserWarning):
    """An opened store holds a partial capture (aborted, or never closed by its writer)."""


class MemoryStore(ActivationStore):
    """Captured tensors kept in a dict in RAM."""

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        self._data: dict[ActivationKey, Tensor] = {}
        self._bytes = 0
        self.metadata = dict(metadata or {})

    def put(self, key: ActivationKey, tensor: Tensor) -> None:
        # Refuse, as the disk store does: an overwrite would silently replace one call's activation by another's.
        if key in self._data:
            raise KeyError(f"{key} was already captured into this MemoryStore; a store takes each "
                           "(site, step, branch, call) once")
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
        if self.aborted is not None:
            disk.mark_aborted(self.aborted)
        disk.close()
        if self.aborted is not None:
            with warnings.catch_warnings():  # the caller knows: this very store is the partial one
                warnings.simplefilter("ignore", IncompleteStoreWarning)
                return ShardedStore.open(root)
        return ShardedStore.open(root)


class ShardedStore(ActivationStore):
    """Tensors streamed to ``root/shard-00000.safetensors, ...`` with an atomic ``index.json``.

    Each flush writes one shard and then its sidecar ``shard-NNNNN.json`` (the keys, shapes and dtypes it
    holds), and rewrites the small index (``n_shards``, ``n_tensors``). :meth:`close` marks the index
    ``closed: true`` — or, for a store marked aborted, ``closed: false`` with an ``aborted`` field.

    Args:
        root: folder (created; must not already hold a store unless ``overwrite``).
        shard_bytes: buffer size that triggers a shard write — the store's RAM ceiling.
        metadata: JSON-serialisable metadata saved in the index (model, sites, seed, version...).
        overwrite: replace an existing store in ``root``: deletes only that store's ``shard-NNNNN.*`` files;
            anything else in the folder stays.

    Attributes:
        complete: ``False`` for a store opened from a writer that did not close it, or that was aborted.
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
        has_index = (self.root / INDEX_NAME).exists()
        if has_index and not overwrite:
            raise FileExistsError(
                f"{self.root} already holds an activation store; pick a new folder, pass overwrite=True, "
                "or open it with ShardedStore.open()"
            )
        shard_files = [f for f in self.root.iterdir() if _SHARD_FILE.fullmatch(f.name)]
        if shard_files and not has_index:
            # Files named like ours but no index: not a store we wrote, so never delete or overwrite them.
            raise FileExistsError(
                f"{self.root} holds files named like store shards ({shard_files[0].name}, ...) but no {INDEX_NAME}; "
                "they are not a scorescope store, so nothing is overwritten: pick another folder"
            )
        for f in shard_files:  # overwrite=True of a store: its own shard files only
            f.unlink()
        if int(shard_bytes) <= 0:
            raise ValueError(f"shard_bytes must be > 0, got {shard_bytes}")
        self.shard_bytes = int(shard_bytes)
        self.metadata = dict(metadata or {})
        self.aborted = None
        self._readonly = False
        self._closed = False
        self._buffer: dict[ActivationKey, Tensor] = {}
        self._buffer_bytes = 0
        self._written_bytes = 0
        self._where: dict[ActivationKey, str] = {}  # key -> shard file name
        self._described: dict[ActivationKey, tuple[tuple[int, ...], str, int]] = {}
        self._n_shards = 0
        self._complete = True
        self._write_index()

    @classmethod
    def open(cls, root: str | Path) -> ShardedStore:
        """Open a store written earlier, read-only.

        A store whose index says ``closed: true`` must hold every shard and sidecar it lists (else
        :class:`DamagedStoreError` names the missing files). A store never closed (its writer crashed or
        still runs) or aborted opens with what was flushed, ``store.complete = False`` and an
        :class:`IncompleteStoreWarning`.

        Raises:
            FileNotFoundError: no ``index.json`` in ``root``.
            DamagedStoreError: invalid JSON (the file is named), an unknown ``format_version``, or missing files.
        """
        root = Path(root)
        index_path = root / INDEX_NAME
        if not index_path.exists():
            raise FileNotFoundError(f"{root} holds no activation store (no {INDEX_NAME})")
        index = _read_json(index_path, "store index")
        if not isinstance(index, dict):
            raise DamagedStoreError(f"{index_path} is not a store index (a JSON object); the store is damaged")
        version = index.get("format_version")
        if version != FORMAT_VERSION:
            raise DamagedStoreError(
                f"{index_path} has format_version {version!r}; this scorescope reads version {FORMAT_VERSION}. "
                "Open it with the scorescope version that wrote it (see metadata.scorescope_version)"
            )
        self = cls.__new__(cls)
        self.root = root
        self.shard_bytes = index.get("shard_bytes", 0)
        self.metadata = index.get("metadata", {})
        self.aborted = index.get("aborted")
        self._readonly, self._closed = True, True
        self._buffer, self._buffer_bytes = {}, 0
        self._where, self._described = {}, {}
        closed = index.get("closed") is True
        sidecars = sorted(f for f in root.glob("shard-*.json") if _SHARD_FILE.fullmatch(f.name))
        problems: list[str] = []
        if closed:
            n_shards = index.get("n_shards")
            expected = {f"shard-{i:05d}.json" for i in range(n_shards if isinstance(n_shards, int) else 0)}
            found = {f.name for f in sidecars}
            if expected - found:
                problems.append(f"missing sidecars {sorted(expected - found)}")
            if found - expected:
                problems.append(f"sidecars not in the index (n_shards={n_shards}): {sorted(found - expected)}")
        for sidecar in sidecars:
            shard = sidecar.with_suffix(".safetensors").name
            if not (root / shard).exists():
                problems.append(f"missing shard {shard} (its sidecar {sidecar.name} is there)")
                continue
            entries = _read_json(sidecar, "shard sidecar")
            try:
                for name, entry in entries.items():
                    key = ActivationKey.decode(name)
                    self._where[key] = shard
                    self._described[key] = (tuple(entry["shape"]), entry["dtype"], entry["bytes"])
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                raise DamagedStoreError(
                    f"{sidecar} (shard sidecar) does not list tensors as site@step@branch@call -> "
                    f"{{shape, dtype, bytes}} ({type(err).__name__}: {err}); the store is damaged"
                ) from None
        if closed and not problems and len(self._where) != index.get("n_tensors"):
            problems.append(f"{len(self._where)} tensors listed by the sidecars, the index says {index.get('n_tensors')}")
        if closed and problems:
            raise DamagedStoreError(
                f"{root} is marked closed (complete) but is damaged: {'; '.join(problems)}. Copy the missing "
                "files back, or recapture"
            )
        self._written_bytes = sum(d[2] for d in self._described.values())
        self._n_shards = len(sidecars)
        self._complete = closed and self.aborted is None
        if not self._complete:
            why = (f"its capture was aborted by {self.aborted}" if self.aborted
                   else "its writer never closed it (crashed, or still running)")
            warnings.warn(
                f"{root} holds a partial capture: {why}; opened the {len(self._where)} tensors of "
                f"{self._n_shards} flushed shard(s){' (' + '; '.join(problems) + ')' if problems else ''}. "
                "store.complete is False",
                IncompleteStoreWarning,
                stacklevel=2,
            )
        return self

    @property
    def complete(self) -> bool:
        return self._complete and self.aborted is None

    # ----------------------------------------------------------------- writing
    def put(self, key: ActivationKey, tensor: Tensor) -> None:
        if self._readonly:
            raise PermissionError(f"{self.root} was opened read-only")
        if self._closed:
            raise RuntimeError(f"the store in {self.root} is closed; open a new ShardedStore to write more")
        if key in self._where or key in self._buffer:
            raise KeyError(f"{key} was already captured into {self.root}; a store takes each "
                           "(site, step, branch, call) once")
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
        atomic_write(self.root / f"{name}.safetensors", blob)
        # Each shard gets its own small index, written after the shard itself: the store's cost of a flush is
        # O(shard), not O(everything so far), and a reader never sees an index entry without its tensor.
        sidecar = {
            k.encode(): {"shape": list(t.shape), "dtype": self._described[k][1], "bytes": self._described[k][2]}
            for k, t in self._buffer.items()
        }
        atomic_write_json(self.root / f"{name}.json", sidecar, indent=None)
        for k in self._buffer:
            self._where[k] = f"{name}.safetensors"
        self._written_bytes += self._buffer_bytes
        self._buffer.clear()
        self._buffer_bytes = 0
        self._n_shards += 1
        self._write_index()  # progress for readers of a store still being written (or crashed)

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
        if self.aborted is not None:
            index["aborted"] = self.aborted
        atomic_write_json(self.root / INDEX_NAME, index)

    def close(self) -> None:
        """Flush and finish the store: ``closed: true`` in the index, or ``closed: false`` plus ``aborted``
        when :meth:`mark_aborted` was called. Idempotent; later :meth:`put` calls are refused."""
        if self._readonly or self._closed:
            return
        self.flush()
        self._write_index(closed=self.aborted is None)
        self._closed = True

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
