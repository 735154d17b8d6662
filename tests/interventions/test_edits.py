"""Edits as data: JSON round-trips, labels, refused arguments, and live-block conflicts."""

from __future__ import annotations

import json

import pytest
import torch

import interventions as iv
from interp import count_hooks
from interp.hooks import HookSet, ProcessorConflictError
from interp.store import MemoryStore


def _roundtrip(edit):
    return iv.Edit.from_dict(json.loads(json.dumps(edit.to_dict())))


@pytest.mark.parametrize("edit", [
    iv.Patch("mid_block", iv.Zero()),
    iv.Patch(["mid_block", "*attn2"], iv.FromStore("/tmp/some-store", site="mid_block"), steps=range(0, 10),
             branch="cond", region=(0.0, 0.5, 0.25, 1.0), channels=[1, 2]),
    iv.Patch("output", iv.Mean("/tmp/some-store"), steps=[1, 3, 5], branch=["cond", "uncond"], channels=slice(0, 4)),
    iv.MaskCrossAttention("up_blocks.*attn2", radius=0.15, steps=slice(2, None)),
    iv.MaskCrossAttention(radius=0.0, steps=4),
    iv.Compose(["mid_block", "up_blocks.0"], radius=0.2, soft=0.05, branch=None),
    iv.ComposeScores(0.3, steps=range(5)),
])
def test_every_edit_round_trips_through_json(edit):
    again = _roundtrip(edit)
    assert again == edit and again.label == edit.label and type(again) is type(edit)


def test_labels_say_what_was_done():
    assert iv.MaskCrossAttention("up_blocks.*attn2", radius=0.15, steps=range(10)).label == \
        "mask-xattn r=0.15 @up_blocks.*attn2 steps=0-9"
    assert iv.Patch("mid_block", iv.Zero(), steps=[3], branch="cond").label == "patch zero @mid_block steps=3 branch=cond"
    assert iv.ComposeScores(0.2).label == "compose-scores r=0.2 @output branch=cond"
    assert iv.Compose("mid_block", radius=0.2, soft=0.1).label == "compose r=0.2 soft=0.1 @mid_block branch=cond"


def test_sources_that_cannot_be_serialised_say_so():
    fn = iv.Fn(torch.neg)
    assert fn.to_dict()["reloadable"] is False and fn.to_dict()["fn"].endswith("neg")
    with pytest.raises(ValueError, match="not reloadable"):
        _roundtrip(iv.Patch("mid_block", fn))
    d = iv.Patch("mid_block", iv.FromStore(MemoryStore())).to_dict()
    assert d["source"]["reloadable"] is False
    with pytest.raises(ValueError, match="in-memory MemoryStore"):
        iv.Edit.from_dict(d)


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: iv.MaskCrossAttention(radius=-0.1), ValueError, "radius"),
    (lambda: iv.MaskCrossAttention(radius=float("nan")), ValueError, "radius"),
    (lambda: iv.MaskCrossAttention(radius=True), TypeError, "radius"),
    (lambda: iv.Compose("mid_block", radius=0.0), ValueError, "radius"),
    (lambda: iv.Compose("mid_block", radius=0.2, soft=-1), ValueError, "soft"),
    (lambda: iv.Patch("mid_block", iv.Zero(), branch="conditional"), ValueError, "branch"),
    (lambda: iv.MaskCrossAttention(radius=0.1, branch=["cond", "unc"]), ValueError, "branch"),
    (lambda: iv.Patch([], iv.Zero()), ValueError, "empty"),
    (lambda: iv.Patch("", iv.Zero()), TypeError, "non-empty"),
    (lambda: iv.Patch("mid_block", iv.Zero(), steps=-1), ValueError, "steps"),
    (lambda: iv.Patch("mid_block", iv.Zero(), steps=[]), ValueError, "empty"),
    (lambda: iv.Patch("mid_block", iv.Zero(), region=(0.5, 0.2, 0, 1)), ValueError, "region"),
    (lambda: iv.Patch("mid_block", torch.zeros(3)), TypeError, "source"),
    (lambda: iv.Fn(3), TypeError, "callable"),
    (lambda: iv.FromStore(42), TypeError, "store"),
])
def test_bad_arguments_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_apply_refuses_nothing_and_non_edits(clevr):
    _, den, _ = clevr
    with pytest.raises(ValueError, match="no edits"):
        iv.apply(den)
    with pytest.raises(TypeError, match="expected Patch"):
        iv.apply(den, "mid_block")


def test_two_live_blocks_may_edit_different_modules_but_not_the_same(clevr):
    _, den, cond = clevr
    x = torch.randn(1, 3, 32, 32)
    with iv.apply(den, iv.Patch("mid_block", iv.Zero())):
        with iv.apply(den, iv.MaskCrossAttention("up_blocks.*attn2", radius=0.1)), torch.no_grad():
            den.predict(x, 500, cond)
        with pytest.raises(iv.EditConflictError, match="mid_block"):
            iv.apply(den, iv.Patch("mid_block", iv.Fn(lambda a, c: a))).__enter__()
    with iv.apply(den, iv.ComposeScores(0.2)), pytest.raises(iv.EditConflictError, match="Compose"):
        iv.apply(den, iv.Compose("mid_block", radius=0.2)).__enter__()
    attn = den.unet.mid_block.attentions[0].transformer_blocks[0].attn2
    with HookSet() as other:
        other.swap_processor(attn, attn.processor)
        with pytest.raises(ProcessorConflictError):
            iv.apply(den, iv.MaskCrossAttention("mid_block.*attn2", radius=0.1)).__enter__()
    with pytest.raises(ValueError, match="both select"):
        iv.apply(den, iv.MaskCrossAttention(radius=0.1), iv.MaskCrossAttention("mid_block.*attn2", radius=0.2)).__enter__()
    assert count_hooks(den.unet) == 0
    # the failed entries released their claims: the modules are free again
    with iv.apply(den, iv.Patch("mid_block", iv.Zero()), iv.MaskCrossAttention(radius=0.1), iv.ComposeScores(0.2)):
        pass


def test_apply_only_edits_the_thread_that_entered_it(clevr):
    import threading

    _, den, cond = clevr
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = den.predict(x, 500, cond)
    box = {}
    with iv.apply(den, iv.Patch("output", iv.Zero()), iv.MaskCrossAttention(radius=0.0)):
        worker = threading.Thread(target=lambda: box.setdefault("out", den.predict(x, 500, cond).detach()))
        with torch.no_grad():
            worker.start()
            worker.join()
            mine = den.predict(x, 500, cond)
    assert torch.equal(box["out"], plain) and (mine == 0).all()


def test_to_dict_of_an_applied_block_is_json(clevr):
    _, den, cond = clevr
    with iv.apply(den, iv.Patch("mid_block", iv.Zero(), branch="cond")) as applied, torch.no_grad():
        den.predict(torch.randn(1, 3, 32, 32), 500, cond)
    d = json.loads(json.dumps(applied.to_dict()))
    assert d["fired"] == [{"edit": 0, "label": "patch zero @mid_block branch=cond", "kind": "patch",
                           "site": "mid_block", "step": -1, "branch": "cond", "calls": 1, "rows": 1}]


def test_an_interrupt_raised_by_an_edits_own_hook_restores_the_model(clevr):
    """KeyboardInterrupt from inside a Fn source (the edit's own forward hook) mid-Compose: nothing stays behind."""
    _, den, cond = clevr
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    processors = {k: id(v) for k, v in den.unet.attn_processors.items()}
    with torch.no_grad():
        plain = den.predict(x, 500, cond)

    def interrupt(act, call):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        with iv.apply(den, iv.Compose("mid_block", radius=0.2), iv.MaskCrossAttention(radius=0.1),
                      iv.Patch("up_blocks.0", iv.Fn(interrupt))):
            den.predict(x, 500, cond)
    assert count_hooks(den.unet) == 0
    assert {k: id(v) for k, v in den.unet.attn_processors.items()} == processors
    with torch.no_grad():
        assert torch.equal(den.predict(x, 500, cond), plain)
    with iv.apply(den, iv.Compose("mid_block", radius=0.2)):  # claims were released
        pass
