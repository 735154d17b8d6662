"""Activation stores: where captured tensors go — memory, or safetensors shards streamed to disk.

A capture of every ``attn2`` output of SDXL over 30 steps is tens of gigabytes; it cannot live in RAM.
:class:`ShardedStore` buffers tensors up to ``shard_bytes`` and then writes one safetensors shard and its
small JSON sidecar, each atomically (:func:`interp.io.atomic_write_with`: temporary file, fsync, rename), so
memory stays flat however long the run, and a crash leaves every flushed shard readable. :class:`MemoryStore` is the
default for small captures. Both answer the same questions: ``store[key]``, ``store.get(site, step,
branch)``, ``store.stack(site)``, ``store.frame()``.

Writing in the background *(``background=True``; what :func:`interp.capture.capture` uses for the stores
it opens)*: a full buffer is handed to one writer thread, which writes the shard straight into its temporary
file (``safetensors.torch.save_file`` from the tensors' own memory: no serialised copy), fsyncs it, renames
it into place, then writes the sidecar and the index — so the sampling thread never waits for the disk unless
the previous shard is still being written (at most one shard is in flight: RAM stays below about twice
``shard_bytes``). A write error is re-raised in the caller at its next ``put``/``flush``/``close``, and the
store is marked aborted. A crash then loses the unflushed buffer and at most the one shard being written;
every shard already renamed into place stays readable, with its sidecar. :meth:`ShardedStore.flush` and
:meth:`~ShardedStore.close` return only when everything handed over is on disk. On CUDA, ``put`` copies a
device tensor into pinned host memory without blocking and the writer waits for that copy (code path not
measured: no GPU here).

A store says whether it is whole: ``store.complete`` is ``False`` for a capture that ended by an exception
(``store.aborted`` holds ``"<ExceptionType>: message"``) or, on disk, for a writer that never closed its
store (crashed, or still running). :meth:`ShardedStore.open` refuses a store that claims to be closed but
lacks shards or sidecars, naming the missing files.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.io import atomic_write_with, file_mode

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
#: Default shard size: RAM of a streamed capture stays near 2× this (buffer + the shard being written).
DEFAULT_SHARD_BYTES = 16 * 2**20
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


def _write_text(text: str) -> Callable[[str], None]:
    def write(name: str) -> None:
        with open(name, "w", encoding="utf-8") as fh:
            fh.write(text)

    return write


def _write_shard(tensors: dict[str, Tensor]) -> Callable[[str], None]:
    def write(name: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, name, metadata={"format": "scorescope-activations"})

    return write


class _Job:
    """One flush: a shard's tensors, its sidecar and the index that follows it, written in this order."""

    def __init__(self, root: Path, name: str, tensors: dict[str, Tensor], sidecar: dict, index: dict,
                 events: list[Any], mode: int) -> None:
        self.root, self.name, self.tensors, self.sidecar, self.index = root, name, tensors, sidecar, index
        self.events, self.mode = events, mode

    def run(self) -> None:
        for event in self.events:  # CUDA → pinned host copies issued without blocking
            event.synchronize()
        if self.tensors:
            atomic_write_with(self.root / f"{self.name}.safetensors", _write_shard(self.tensors), mode=self.mode)
            # The sidecar after its shard: a reader never sees an index entry without its tensor.
            atomic_write_with(self.root / f"{self.name}.json", _write_text(json.dumps(self.sidecar, default=str)), mode=self.mode)
        atomic_write_with(self.root / INDEX_NAME, _write_text(json.dumps(self.index, indent=1, default=str)), mode=self.mode)


class _Writer:
    """One background thread that runs :class:`_Job` s in order, at most one at a time (a hand-off, no queue).

    :meth:`submit` waits for the previous job, so at most one shard is in flight; an error of a job is kept
    and re-raised by the next :meth:`submit` / :meth:`wait` in the caller's thread.
    """

    def __init__(self) -> None:
        self._idle = threading.Semaphore(1)
        self._jobs: list[_Job | None] = []
        self._ready = threading.Condition()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="scorescope-store-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._jobs:
                    self._ready.wait()
                job = self._jobs.pop(0)
            if job is None:
                return
            try:
                job.run()
            # Not swallowed: a thread cannot raise into its caller, so the error is handed over and re-raised
            # there (wait/submit) — whatever its type, or the caller would believe the shard was written.
            except BaseException as err:  # noqa: BLE001
                self.error = err
            finally:
                self._idle.release()

    def wait(self) -> None:
        """Block until the job in flight is written; re-raise its error here."""
        self._idle.acquire()
        self._idle.release()
        if self.error is not None:
            raise self.error

    def submit(self, job: _Job) -> None:
        self._idle.acquire()  # the previous job is done: at most one in flight
        if self.error is not None:
            self._idle.release()
            raise self.error
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()

    def stop(self) -> None:
        """Finish the job in flight and end the thread (its error, if any, stays in :attr:`error`)."""
        self._idle.acquire()
        self._idle.release()
        with self._ready:
            self._jobs.append(None)
            self._ready.notify()
        self._thread.join()


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
        shard_bytes: buffer size that triggers a shard write (default 16 MiB). RAM ceiling: ``shard_bytes``
            (plus one tensor), twice that with ``background=True`` (the buffer and the shard being written).
        background: write full shards on a writer thread (see the module docstring); ``False`` writes them
            in the thread that calls :meth:`put`, before it returns.
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
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
        background: bool = False,
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
        self._mode = file_mode()  # read once here: the umask is process-global, the writer thread must not read it
        self._events: dict[ActivationKey, Any] = {}  # CUDA copy events of buffered tensors
        self._inflight: dict[ActivationKey, Tensor] = {}  # handed to the writer, maybe not yet on disk
        self._inflight_bytes = 0
        self._failed: BaseException | None = None  # the writer's error, once re-raised in the caller
        self._writer = _Writer() if background else None
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
        self._events, self._inflight, self._inflight_bytes = {}, {}, 0
        self._writer, self._failed = None, None
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
        if self._failed is not None:
            raise RuntimeError(f"the store in {self.root} could not write a shard "
                               f"({type(self._failed).__name__}: {self._failed}) and takes no more tensors") from self._failed
        if key in self._where or key in self._buffer:
            raise KeyError(f"{key} was already captured into {self.root}; a store takes each "
                           "(site, step, branch, call) once")
        if tensor.is_cuda:
            # Pinned host buffer + non-blocking copy: the sampling stream is not stalled; the writer (or a read)
            # waits for the copy's event. Stream order makes it safe even if the model reuses the device memory.
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensor.device))
            self._events[key] = event
            tensor = host
        else:
            tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self._buffer[key] = tensor
        self._buffer_bytes += nbytes
        self._described[key] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), nbytes)
        if self._buffer_bytes >= self.shard_bytes:
            self._flush(wait=False)

    def flush(self) -> None:
        """Write the buffered tensors as one shard; returns when everything handed over is on disk."""
        self._flush(wait=True)

    def _flush(self, *, wait: bool, final: bool = False) -> None:
        """Hand the buffer to the writer (or write it here); ``final``: the index written with it is the closing
        one (``closed`` unless aborted), so closing costs no extra index write."""
        if self._readonly or self._failed is not None:
            return
        if final and not self._buffer:  # nothing left to write but the closing index, after the shard in flight
            if self._writer is not None:
                self._writer_call(self._writer.wait)
                self._inflight, self._inflight_bytes = {}, 0
            self._write_index(closed=self.aborted is None)
            return
        if self._buffer:
            name = f"shard-{self._n_shards:05d}"
            # Each shard gets its own small index, written after the shard itself: the store's cost of a flush is
            # O(shard), not O(everything so far), and a reader never sees an index entry without its tensor.
            sidecar = {k.encode(): {"shape": list(t.shape), "dtype": self._described[k][1], "bytes": self._described[k][2]}
                       for k, t in self._buffer.items()}
            index = self._index(closed=final and self.aborted is None, n_shards=self._n_shards + 1,
                                n_tensors=len(self._where) + len(self._buffer))
            job = _Job(self.root, name, {k.encode(): t for k, t in self._buffer.items()}, sidecar, index,
                       [self._events[k] for k in self._buffer if k in self._events], self._mode)
            if self._writer is None:
                job.run()  # raises before any bookkeeping: a failed flush keeps its buffer, as it always did
            else:
                self._writer_call(self._writer.submit, job)
                self._inflight, self._inflight_bytes = dict(self._buffer), self._buffer_bytes  # the previous one is on disk
            for k in self._buffer:
                self._where[k] = f"{name}.safetensors"
                self._events.pop(k, None)
            self._written_bytes += self._buffer_bytes
            self._buffer = {}
            self._buffer_bytes = 0
            self._n_shards += 1
        if wait and self._writer is not None:
            self._writer_call(self._writer.wait)
            self._inflight, self._inflight_bytes = {}, 0

    def _writer_call(self, call: Callable[..., None], *args: Any) -> None:
        """Run ``call`` (a hand-off or a wait); a write error of the writer thread is re-raised here, once."""
        try:
            call(*args)
        finally:
            if self._writer is not None and self._writer.error is not None and self._failed is None:
                self._failed = self._writer.error
                if self.aborted is None:
                    self.mark_aborted(f"{type(self._failed).__name__}: {self._failed}")

    def _index(self, *, closed: bool = False, n_shards: int | None = None, n_tensors: int | None = None) -> dict[str, Any]:
        index = {
            "format_version": FORMAT_VERSION,
            "shard_bytes": self.shard_bytes,
            "metadata": self.metadata,
            "closed": closed,
            "n_shards": self._n_shards if n_shards is None else n_shards,
            "n_tensors": len(self._where) if n_tensors is None else n_tensors,
            "layout": "shard-NNNNN.safetensors holds the tensors; shard-NNNNN.json lists them (key: site@step@branch@call)",
        }
        if self.aborted is not None:
            index["aborted"] = self.aborted
        return index

    def _write_index(self, *, closed: bool = False) -> None:
        atomic_write_with(self.root / INDEX_NAME, _write_text(json.dumps(self._index(closed=closed), indent=1, default=str)),
                          mode=self._mode)

    def close(self) -> None:
        """Flush and finish the store: ``closed: true`` in the index, or ``closed: false`` plus ``aborted``
        when :meth:`mark_aborted` was called or a background write failed (that error is raised here unless
        an earlier call already raised it). Idempotent; later :meth:`put` calls are refused."""
        if self._readonly or self._closed:
            return
        try:
            self._flush(wait=True, final=True)
        finally:
            if self._writer is not None:
                self._writer.stop()
            if self._failed is not None:  # the failed shard cannot be written again: finish as aborted
                self._write_index(closed=False)
                self._closed = True
        self._closed = True

    # ----------------------------------------------------------------- reading
    def __getitem__(self, key: ActivationKey) -> Tensor:
        if key in self._buffer:
            if key in self._events:
                self._events[key].synchronize()
            return self._buffer[key]
        if key in self._inflight:
            return self._inflight[key]
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
        return self._buffer_bytes + self._inflight_bytes


def open_store(root: str | Path) -> ShardedStore:
    """Open a capture streamed to disk earlier."""
    return ShardedStore.open(root)
