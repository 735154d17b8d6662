"""Background shard writing: same files as the synchronous writer, errors surface in the caller, RAM bounded."""

from __future__ import annotations

import json
import threading
import warnings

import pytest
import torch

import interp.store as store_mod
from interp.capture import capture
from interp.models.analytic import toy_conditioning, toy_denoiser
from interp.store import ActivationKey, IncompleteStoreWarning, ShardedStore, open_store


def _key(i: int) -> ActivationKey:
    return ActivationKey("mid_block", i, "cond", i)


def _tensors(n: int = 7) -> dict[ActivationKey, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {_key(i): torch.randn(100, generator=g) for i in range(n)}  # 400 bytes each


def _failing_shard_writer(monkeypatch, fail_at: int) -> list[int]:
    """Make the ``fail_at``-th shard write (0-based) raise ``OSError("disk full")``; returns the attempt counter."""
    real = store_mod._write_shard
    attempts = [0]

    def write_shard(tensors):
        n = attempts[0]
        attempts[0] += 1
        if n == fail_at:
            def fail(name: str) -> None:
                raise OSError("disk full")
            return fail
        return real(tensors)

    monkeypatch.setattr(store_mod, "_write_shard", write_shard)
    return attempts


def test_background_store_writes_the_same_files_as_the_synchronous_one(tmp_path):
    tensors = _tensors()
    for name, background in (("sync", False), ("bg", True)):
        st = ShardedStore(tmp_path / name, shard_bytes=1000, metadata={"seed": 1}, background=background)
        for k, t in tensors.items():
            st.put(k, t)
            assert torch.equal(st[k], t)  # readable at once, buffered, in flight or on disk
        st.close()
    sync_files = sorted(f.name for f in (tmp_path / "sync").iterdir())
    assert sync_files == sorted(f.name for f in (tmp_path / "bg").iterdir())
    assert len([f for f in sync_files if f.endswith(".safetensors")]) == 3  # 3 + 3 + 1 tensors
    for name in sync_files:  # byte-identical shards, sidecars and index
        assert (tmp_path / "sync" / name).read_bytes() == (tmp_path / "bg" / name).read_bytes(), name
    back = open_store(tmp_path / "bg")
    assert back.complete and sorted(back.keys()) == sorted(tensors)
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_a_background_write_error_is_raised_in_the_caller_and_the_store_is_aborted(tmp_path, monkeypatch):
    _failing_shard_writer(monkeypatch, fail_at=1)
    tensors = _tensors(10)
    st = ShardedStore(tmp_path / "s", shard_bytes=1000, background=True)
    with pytest.raises(OSError, match="disk full"):
        for k, t in tensors.items():  # shard 1 fails on the writer thread; a later put (or close) re-raises it
            st.put(k, t)
        st.close()
    assert st.aborted == "OSError: disk full" and not st.complete
    with pytest.raises(RuntimeError, match="could not write a shard"):
        st.put(_key(99), torch.zeros(1))
    st.close()  # finishes as aborted; the error was already raised once
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["closed"] is False and index["aborted"] == "OSError: disk full"
    assert not list((tmp_path / "s").glob(".*"))  # the failed temporary file was removed
    with pytest.warns(IncompleteStoreWarning, match="aborted"):
        back = open_store(tmp_path / "s")
    assert sorted(back.keys()) == sorted(tensors)[:3]  # shard 0 is intact
    assert all(torch.equal(back[k], tensors[k]) for k in back.keys())


def test_a_write_error_at_close_is_raised_there(tmp_path, monkeypatch):
    _failing_shard_writer(monkeypatch, fail_at=0)
    st = ShardedStore(tmp_path / "s", shard_bytes=10**6, background=True)
    st.put(_key(0), torch.zeros(10))
    with pytest.raises(OSError, match="disk full"):
        st.close()
    assert st.aborted == "OSError: disk full"
    assert json.loads((tmp_path / "s" / "index.json").read_text())["closed"] is False


def test_capture_into_a_folder_writes_in_the_background_and_surfaces_a_write_error(tmp_path, monkeypatch):
    den = toy_denoiser("global", size=8)
    cond = toy_conditioning([[0.25, 0.25], [0.75, 0.7]])
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(den, ["convs.0", "convs.1", "norm"], store=tmp_path / "ok") as cap:
        assert cap.store._writer is not None  # the folder store capture opens writes off the sampling thread
        for step in range(4):
            den(x, 10 + step, cond)
    assert open_store(tmp_path / "ok").complete and len(open_store(tmp_path / "ok")) == 12

    _failing_shard_writer(monkeypatch, fail_at=0)
    with pytest.raises(OSError, match="disk full"):
        with torch.no_grad(), capture(den, ["convs.0", "convs.1", "norm"], store=tmp_path / "bad") as cap:
            cap.store.shard_bytes = 1  # a shard per tensor: the failure is seen by a later put, inside the forward
            for step in range(4):
                den(x, 10 + step, cond)
    assert cap.store.aborted is not None and cap.store.aborted.startswith("OSError")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteStoreWarning)
        assert not open_store(tmp_path / "bad").complete


def test_at_most_one_shard_is_in_flight(tmp_path, monkeypatch):
    """While the writer is stuck on a shard, the caller blocks at the next full buffer: RAM stays ≤ 2 shards."""
    real = store_mod._write_shard
    release = threading.Event()

    def slow(tensors):
        inner = real(tensors)

        def write(name: str) -> None:
            release.wait(10)
            inner(name)
        return write

    monkeypatch.setattr(store_mod, "_write_shard", slow)
    st = ShardedStore(tmp_path / "s", shard_bytes=1000, background=True)
    tensors = _tensors(9)
    done = threading.Event()
    peak = [0]

    def producer() -> None:
        for k, t in tensors.items():
            st.put(k, t)
            peak[0] = max(peak[0], st.resident_bytes)
        done.set()

    th = threading.Thread(target=producer)
    th.start()
    assert not done.wait(0.5)  # the 6th put needs a second hand-off and waits for the stuck first shard
    release.set()
    th.join(10)
    st.close()
    assert done.is_set() and peak[0] <= 2 * 1000 + 400
    assert len(open_store(tmp_path / "s")) == 9
