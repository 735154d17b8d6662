"""Capture inputs: bad arguments refused up front, selections that match nothing refused at exit, the read API."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from interp import Site, count_hooks, sample
from interp.capture import SiteSelectionError, capture, read_activation, read_activations


@pytest.fixture()
def clevr(tiny_clevr_pipe):
    den = tiny_clevr_pipe.denoiser()  # no guidance: one U-Net call per step, branch "cond"
    return den, tiny_clevr_pipe.conditioning([[0.3, 0.6]])


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"on_over_budget": "explode"}, ValueError, "on_over_budget"),
        ({"cfg": "batchd"}, ValueError, "cfg"),
        ({"budget": "-5MB"}, ValueError, "budget"),
        ({"budget": "lots"}, ValueError, "budget"),
        ({"budget": 0}, ValueError, "budget"),
        ({"budget": True}, TypeError, "budget"),
        ({"store_dtype": 3}, TypeError, "store_dtype"),
        ({"store_dtype": torch.int8}, ValueError, "store_dtype"),
        ({"store_dtype": torch.bool}, ValueError, "store_dtype"),
        ({"count_steps": "yes"}, TypeError, "count_steps"),
        ({"store": 5}, TypeError, "store"),
    ],
)
def test_bad_capture_arguments_are_refused_naming_the_argument(clevr, kwargs, error, named):
    den, _ = clevr
    with pytest.raises(error, match=named):
        capture(den, "mid_block", **kwargs)
    assert count_hooks(den.unet) == 0


def test_good_capture_arguments_still_pass(clevr):
    den, cond = clevr
    with torch.no_grad(), capture(den, "mid_block", budget="1.5MiB", store_dtype=torch.float16, cfg=None) as cap:
        den.predict(torch.randn(1, 3, 32, 32), 10, cond)
    assert cap.budget == int(1.5 * 2**20) and cap.store.get("mid_block").dtype == torch.float16


def test_steps_that_never_ran_raise_after_the_store_is_saved(clevr, tmp_path):
    den, cond = clevr
    with pytest.raises(SiteSelectionError) as err:
        with torch.no_grad(), capture(den, [Site("mid_block", steps=[7, 9]), "conv_out"], store=tmp_path / "acts"):
            sample(den, cond, shape=(1, 3, 32, 32), num_steps=3, seed=0)
    msg = str(err.value)
    assert "'mid_block'" in msg and "(7, 9)" in msg and "steps [0, 1, 2]" in msg
    index = json.loads((tmp_path / "acts" / "index.json").read_text())
    assert index["closed"] is True and index["n_tensors"] == 3  # conv_out of every step: nothing lost
    assert count_hooks(den.unet) == 0


def test_a_branch_that_never_ran_raises(clevr):
    den, cond = clevr
    with pytest.raises(SiteSelectionError, match=r"branches \['cond'\]"):
        with torch.no_grad(), capture(den, Site("mid_block", branch="uncond")):
            den.predict(torch.randn(1, 3, 32, 32), 10, cond)


def test_unannounced_steps_are_explained(clevr):
    den, cond = clevr
    with pytest.raises(SiteSelectionError, match="none announced"):
        with torch.no_grad(), capture(den, Site("mid_block", steps=0)):
            den.predict(torch.randn(1, 3, 32, 32), 10, cond)


def test_some_missing_steps_warn_and_the_rest_is_captured(clevr):
    den, cond = clevr
    with pytest.warns(UserWarning, match=r"steps \[5\] that did not run"):
        with torch.no_grad(), capture(den, Site("mid_block", steps=[1, 5])) as cap:
            sample(den, cond, shape=(1, 3, 32, 32), num_steps=3, seed=0)
    assert [k.step for k in cap.store.keys()] == [1]


def test_a_capture_with_no_forward_judges_no_selection(clevr):
    den, _ = clevr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with capture(den, Site("mid_block", steps=[3])) as cap:
            pass
    assert len(cap.store) == 0


# --------------------------------------------------------------------------- read_activation API


def test_read_activation_takes_t_or_timestep_and_the_old_call_warns(clevr):
    den, cond = clevr
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ts = den.timestep(0.5)
    with torch.no_grad():
        by_t = read_activation(den, "mid_block", cond, x_t=x, t=0.5)
        by_timestep = read_activation(den, "mid_block", cond, x_t=x, timestep=ts)
        with pytest.warns(DeprecationWarning, match=r"read_activation\(den, site, cond, x_t=x_t, timestep=t\)"):
            old = read_activation(den, "mid_block", x, ts, cond)
        with pytest.warns(DeprecationWarning, match="read_activations"):
            old_many = read_activations(den, ["mid_block", "conv_out"], x, ts, cond)
        many = read_activations(den, ["mid_block", "conv_out"], cond, x_t=x, t=0.5)
    assert torch.equal(by_t, by_timestep) and torch.equal(by_t, old)
    assert set(many) == {"mid_block", "conv_out"} and torch.equal(many["mid_block"], by_t)
    assert all(torch.equal(many[k], old_many[k]) for k in many)


def test_read_activation_refuses_ambiguous_calls(clevr):
    den, cond = clevr
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="exactly one of t="):
        read_activation(den, "mid_block", cond, x_t=x)
    with pytest.raises(ValueError, match="exactly one of t="):
        read_activation(den, "mid_block", cond, x_t=x, t=0.5, timestep=10)
    with pytest.raises(TypeError, match="x_t="):
        read_activation(den, "mid_block", cond, t=0.5)
    with pytest.raises(TypeError, match="cond must be a Conditioning"):
        read_activation(den, "mid_block", x, x_t=x, t=0.5)
    with pytest.raises(TypeError, match="positional"):
        read_activation(den, "mid_block", cond, x, x_t=x, t=0.5)
    with pytest.raises(ValueError, match="branch"):
        read_activation(den, "mid_block", cond, x_t=x, t=0.5, branch="guided")
    with pytest.raises(TypeError, match="list of module paths"):
        read_activations(den, "mid_block", cond, x_t=x, t=0.5)
    assert count_hooks(den.unet) == 0
