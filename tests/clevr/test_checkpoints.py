"""The shipped reference checkpoints: present, small, loadable by name, with their manifest and eval table."""

from __future__ import annotations

import pytest
import torch

from interp.clevr.checkpoints import ASSETS, MAX_BYTES_EACH, MAX_BYTES_TOTAL, SHIPPED, folder_bytes, load_clevr, read_manifest
from interp.models.clevr_local import ClevrLocalUNet


def test_manifest_lists_every_checkpoint_with_its_provenance_and_eval():
    man = read_manifest()
    assert set(man["models"]) == set(SHIPPED)
    total = 0
    for name in SHIPPED:
        entry = man["models"][name]
        for key in ("recipe", "steps", "seed", "wall_time_s", "machine", "eval"):
            assert key in entry, f"{name}: manifest entry lacks {key!r}"
        assert [r["k"] for r in entry["eval"]["per_k"]] == list(range(11))
        size = folder_bytes(ASSETS / name)
        assert size <= MAX_BYTES_EACH and size == entry["bytes"]
        total += size
    assert total <= MAX_BYTES_TOTAL


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoints_load_by_name_and_sample(name):
    pipe = load_clevr(name)
    assert pipe.unet.dtype == torch.float32
    assert isinstance(pipe.unet, ClevrLocalUNet) == (name == "exp3")
    kw = {"colours": ["red", "blue"]} if name == "colour" else {}
    cond = pipe.conditioning([[0.3, 0.3], [0.7, 0.6]], **kw)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    eps = pipe.denoiser()(x, 500, cond)
    assert eps.shape == (1, 3, 32, 32) and torch.isfinite(eps).all()


def test_registry_and_errors():
    from interp.models.registry import load_model

    m = load_model("exp1")
    assert m.family == "clevr" and m.name == "exp1"
    with pytest.raises(ValueError, match="unknown CLEVR checkpoint"):
        load_clevr("exp5")
