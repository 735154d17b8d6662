"""Activation stores: duplicate keys refused, damaged stores named, partial stores flagged, ordinary file modes."""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest
import torch

from interp.store import (
    ActivationKey,
    DamagedStoreError,
    IncompleteStoreWarning,
    MemoryStore,
    ShardedStore,
    open_store,
)


def _key(i: int) -> ActivationKey:
    return ActivationKey("mid_block", i, "cond", i)


def _write(root, n: int = 5, shard_bytes: int = 1000, close: bool = True) -> dict[ActivationKey, torch.Tensor]:
    """A store of ``n`` 400-byte tensors: a shard is flushed every third tensor."""
    store = ShardedStore(root, shard_bytes=shard_bytes, metadata={"seed": 1})
    tensors = {_key(i): torch.full((100,), float(i)) for i in range(n)}
    for key, t in tensors.items():
        store.put(key, t)
    if close:
        store.close()
    return tensors


def test_both_stores_refuse_a_duplicate_key(tmp_path):
    mem = MemoryStore()
    mem.put(_key(0), torch.zeros(3))
    with pytest.raises(KeyError, match="already captured"):  # old code: silently overwritten
        mem.put(_key(0), torch.ones(3))
    assert torch.equal(mem[_key(0)], torch.zeros(3)) and mem.nbytes == 12
    disk = ShardedStore(tmp_path / "s", shard_bytes=1)
    disk.put(_key(0), torch.zeros(3))  # flushed at once
    with pytest.raises(KeyError, match="already captured"):
        disk.put(_key(0), torch.ones(3))


def test_index_counts_are_right_at_every_flush_and_at_close(tmp_path):
    root = tmp_path / "s"
    store = ShardedStore(root, shard_bytes=1000)
    for i in range(4):
        store.put(_key(i), torch.zeros(100))
    index = json.loads((root / "index.json").read_text())
    assert (index["n_shards"], index["n_tensors"], index["closed"]) == (1, 3, False)
    store.close()
    index = json.loads((root / "index.json").read_text())
    assert (index["n_shards"], index["n_tensors"], index["closed"]) == (2, 4, True)
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.put(_key(9), torch.zeros(1))
    assert len(open_store(root)) == 4


def test_store_files_have_ordinary_permissions(tmp_path):
    _write(tmp_path / "s")
    mask = os.umask(0o022)
    os.umask(mask)
    files = sorted((tmp_path / "s").iterdir())
    assert [f.name for f in files] == ["index.json", "shard-00000.json", "shard-00000.safetensors",
                                       "shard-00001.json", "shard-00001.safetensors"]
    for f in files:  # old code: 0o600 (mkstemp's mode) for every store file
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name


def test_overwrite_deletes_only_the_store_own_files(tmp_path):
    root = tmp_path / "s"
    _write(root, n=5)
    (root / "notes.txt").write_text("mine")
    (root / "shard-notes.json").write_text("{}")
    store = ShardedStore(root, overwrite=True)
    store.put(_key(0), torch.zeros(2))
    store.close()
    assert (root / "notes.txt").read_text() == "mine" and (root / "shard-notes.json").exists()
    assert not (root / "shard-00001.safetensors").exists()
    assert len(open_store(root)) == 1


def test_shard_named_files_without_an_index_are_never_overwritten(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / "shard-00000.safetensors").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="not a scorescope store"):
        ShardedStore(root, overwrite=True)
    assert (root / "shard-00000.safetensors").read_bytes() == b"someone else's"


@pytest.mark.parametrize(("damage", "named"), [
    (lambda r: (r / "shard-00001.json").unlink(), "missing sidecars ['shard-00001.json']"),
    (lambda r: (r / "shard-00000.safetensors").unlink(), "missing shard shard-00000.safetensors"),
])
def test_a_closed_store_missing_files_is_refused_naming_them(tmp_path, damage, named):
    root = tmp_path / "s"
    _write(root)
    damage(root)
    with pytest.raises(DamagedStoreError) as err:  # old code: opened with the tensors silently dropped
        open_store(root)
    assert named in str(err.value)


def test_a_tensor_count_mismatch_is_refused(tmp_path):
    root = tmp_path / "s"
    _write(root)
    index = json.loads((root / "index.json").read_text())
    index["n_tensors"] = 6
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(DamagedStoreError, match="5 tensors listed by the sidecars, the index says 6"):
        open_store(root)


@pytest.mark.parametrize("name", ["index.json", "shard-00001.json"])
def test_corrupt_json_names_the_file(tmp_path, name):
    root = tmp_path / "s"
    _write(root)
    (root / name).write_text('{"format_version": 1, ')
    with pytest.raises(DamagedStoreError, match=str(root / name).replace(".", r"\.")):
        open_store(root)


def test_unknown_format_version_is_refused(tmp_path):
    root = tmp_path / "s"
    _write(root)
    index = json.loads((root / "index.json").read_text())
    index["format_version"] = 99
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(DamagedStoreError, match="format_version 99"):
        open_store(root)


def test_an_unclosed_store_opens_what_was_flushed_and_says_so(tmp_path):
    root = tmp_path / "s"
    tensors = _write(root, close=False)
    with pytest.warns(IncompleteStoreWarning, match="never closed"):
        back = open_store(root)
    assert not back.complete and sorted(back.keys()) == sorted(tensors)[:3]
    assert all(torch.equal(back[k], tensors[k]) for k in back.keys())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _write(tmp_path / "closed")
        assert open_store(tmp_path / "closed").complete


def test_an_aborted_memory_store_saves_as_aborted(tmp_path):
    mem = MemoryStore(metadata={"seed": 2})
    mem.put(_key(0), torch.zeros(2))
    assert mem.complete
    mem.mark_aborted("RuntimeError: boom")
    back = mem.save(tmp_path / "s")
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["closed"] is False and index["aborted"] == "RuntimeError: boom"
    assert not back.complete and len(back) == 1
