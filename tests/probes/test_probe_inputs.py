"""Probes refuse what they cannot measure: each message names the argument and the fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import probes
from interp.inputs import check_locations, noisy_inputs, pixel_list, resolve_timestep


def test_non_integer_pixels_are_refused_not_truncated():
    with pytest.raises(ValueError, match="integer"):
        pixel_list([(3.7, 2.0)], (8, 8))
    assert pixel_list([(3.0, 2.0)], (8, 8)).tolist() == [[3, 2]]  # whole floats are the same pixel
    with pytest.raises(ValueError, match=r"\(row, col\) pairs"):
        pixel_list([1, 2, 3], (8, 8))


@pytest.mark.parametrize("bad", [[[0.2, float("nan")]], [[1.2, 0.5]], [[-0.1, 0.5]], [[0.2, float("inf")]]])
def test_locations_outside_the_image_or_nan_are_refused(bad):
    with pytest.raises(ValueError, match="locations"):
        check_locations(torch.tensor(bad))


@pytest.mark.parametrize("probe", ["conditional_locality", "cpc_residual"])
def test_probes_refuse_nan_locations_instead_of_reporting_zero(local_den, toy_cond, probe):
    # Whether the Conditioning refuses the NaN on construction or the probe refuses it before measuring, the
    # error names the locations; what must never happen is a reported in-region 0.0 or residual 1.0.
    with pytest.raises(ValueError, match="locations"):
        bad = dataclasses.replace(toy_cond, locations=torch.tensor([[0.25, 0.25], [float("nan"), 0.7]]))
        getattr(probes, probe)(local_den, bad, t=0.5, seeds=1, dtype=torch.float64)


def test_nan_x_t_is_named_as_the_input_even_inside_torch_func(local_den, toy_cond):
    x = torch.zeros(1, 3, 12, 12, dtype=torch.float64)
    x[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="x_t contains 1 NaN"):
        probes.pixel_jacobian(local_den, toy_cond, x_t=x, t=0.5, pixels=[(1, 1)], chunk_size=2)
    v = torch.zeros(1, *toy_cond.tokens.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="x_t contains 1 NaN"):
        probes.conditioner_jvp(local_den, toy_cond, v, x_t=x, t=0.5)


def test_t_and_timestep_are_one_or_the_other(local_den):
    with pytest.raises(ValueError, match="exactly one of t="):
        resolve_timestep(local_den)
    with pytest.raises(ValueError, match="exactly one of t="):
        resolve_timestep(local_den, t=0.5, timestep=500)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        resolve_timestep(local_den, t=5000)
    assert int(resolve_timestep(local_den, t=0.5)) == int(local_den.timestep(0.5))
    with pytest.raises(ValueError, match="one noise level"):
        noisy_inputs(local_den, [0.1, 0.5], 1, x_t=torch.zeros(1, 3, 12, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="timestep= describes an explicit x_t"):
        noisy_inputs(local_den, None, 1, timestep=500)


def test_explicit_x_t_equals_the_forward_samples_it_was_built_from(local_den, toy_cond):
    """``x_t=`` with ``t=`` measures exactly what the default forward-process path measures."""
    from interp.inputs import forward_samples

    x, _ = forward_samples(local_den, 0.5, [3], dtype=torch.float64)
    a = probes.pixel_locality(local_den, toy_cond, t=0.5, seeds=[3], pixels=[(4, 4)], dtype=torch.float64)
    b = probes.pixel_locality(local_den, toy_cond, t=0.5, x_t=x, pixels=[(4, 4)])
    assert torch.equal(a["G"], b["G"])
    c = probes.conditional_locality(local_den, toy_cond, t=0.5, seeds=[3], directions="all", dtype=torch.float64)
    d = probes.conditional_locality(local_den, toy_cond, timestep=local_den.timestep(0.5), x_t=x, directions="all")
    assert torch.equal(c["jvp"], d["jvp"]) and torch.equal(c["ablation"], d["ablation"])


def test_the_old_positional_calls_still_work_with_a_deprecation_warning(local_den, toy_cond):
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = local_den.timestep(0.5)
    new = probes.pixel_jacobian(local_den, toy_cond, x_t=x, timestep=ts, pixels=[(2, 2)])
    with pytest.warns(DeprecationWarning, match="pixel_jacobian"):
        old = probes.pixel_jacobian(local_den, x, ts, toy_cond, pixels=[(2, 2)])
    assert torch.equal(new, old)
    with pytest.warns(DeprecationWarning, match="radius_px"):
        probes.pixel_locality(local_den, toy_cond, t=0.5, seeds=1, pixels=[(2, 2)], method="compressed", radius=2,
                              dtype=torch.float64)


def test_output_is_now_quantity_and_the_old_keyword_still_works(local_den, toy_cond):
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    new = probes.pixel_jacobian(local_den, toy_cond, x_t=x, t=0.5, pixels=[(2, 2)], quantity="score")
    with pytest.warns(DeprecationWarning, match="quantity="):
        old = probes.pixel_jacobian(local_den, toy_cond, x_t=x, t=0.5, pixels=[(2, 2)], output="score")
    assert torch.equal(new, old)
    assert not torch.equal(new, probes.pixel_jacobian(local_den, toy_cond, x_t=x, t=0.5, pixels=[(2, 2)]))
    with pytest.raises(TypeError, match="only quantity="):
        probes.pixel_jacobian(local_den, toy_cond, x_t=x, t=0.5, quantity="score", output="score")
    with pytest.raises(ValueError, match="quantity must be"):
        probes.pixel_jacobian(local_den, toy_cond, x_t=x, t=0.5, quantity="scores")


@pytest.mark.parametrize("bad", ["-5MB", "lots", 0, float("nan"), True])
def test_memory_budget_must_be_a_positive_size(local_den, toy_cond, bad):
    x = torch.zeros(1, 3, 12, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="memory_budget"):
        probes.pixel_jacobian(local_den, toy_cond, x_t=x, t=0.5, pixels=[(1, 1)], memory_budget=bad)
