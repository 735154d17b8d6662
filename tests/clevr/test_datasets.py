"""The streamed datasets: seeded by (seed, index), exp1/exp2 share images, conditioners match the scenes."""

from __future__ import annotations

import pytest
import torch

from interp.clevr.datasets import ClevrStream
from interp.clevr.render import MIN_SEPARATION


def test_batches_are_a_function_of_seed_and_index():
    a = ClevrStream("exp1", 8, seed=1).batch(5)
    b = ClevrStream("exp1", 8, seed=1).batch(5)
    c = ClevrStream("exp1", 8, seed=1).batch(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["images"], c["images"])
    assert a["images"].shape == (8, 3, 32, 32) and a["images"].min() >= -1 and a["images"].max() <= 1


def test_exp1_lists_every_object_and_exp2_one_of_them():
    e1 = ClevrStream("exp1", 16, seed=2).batch(0)
    e2 = ClevrStream("exp2", 16, seed=2).batch(0)
    assert torch.equal(e1["images"], e2["images"]), "exp1 and exp2 must share images"
    assert (e1["mask"].sum(1) == e1["counts"]).all()
    assert e2["locations"].shape == (16, 1, 2) and e2["mask"].all()
    for b in range(16):
        listed = e1["locations"][b][e1["mask"][b]]
        d = (listed - e2["locations"][b, 0]).norm(dim=-1)
        assert d.min() < 1e-6, "exp2's location must be one of the scene's objects"
        if len(listed) > 1:
            dd = (listed[:, None] - listed[None]).norm(dim=-1) + torch.eye(len(listed)) * 9
            assert dd.min() >= MIN_SEPARATION - 1e-5


def test_colour_recipe_lists_colours_of_the_listed_objects():
    b = ClevrStream("colour", 8, seed=0).batch(1)
    assert b["colours"].shape == b["mask"].shape
    assert ((b["colours"] >= 0) & (b["colours"] < 8)).all()


def test_unknown_recipe_raises():
    with pytest.raises(ValueError, match="unknown recipe"):
        ClevrStream("exp9")
