"""Denoiser: exact passthrough, CFG branches, score conversions, and errors that name the problem."""

from __future__ import annotations

import pytest
import torch

from interp import Conditioning, Denoiser
from interp.capture import capture
from interp.models import prompt_conditioning, sdxl_denoiser


@pytest.fixture()
def sdxl(tiny_sdxl_pipe):
    cond = prompt_conditioning(tiny_sdxl_pipe, ["a red cube", "a blue sphere"])
    return tiny_sdxl_pipe, cond


def test_prediction_equals_direct_unet_call(sdxl):
    pipe, cond = sdxl
    den = sdxl_denoiser(pipe, guidance_scale=None)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        direct = pipe.unet(
            x,
            torch.tensor(400),
            cond.tokens.expand(2, -1, -1),
            added_cond_kwargs={k: v.expand(2, *v.shape) for k, v in cond.added.items()},
        ).sample
        ours = den(x, 400, cond)
    assert torch.equal(direct, ours)


def test_guided_is_uncond_plus_scaled_difference(sdxl):
    pipe, cond = sdxl
    den = sdxl_denoiser(pipe, guidance_scale=4.0)
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        br = den.branches(x, 300, cond)
        assert torch.allclose(br["guided"], br["uncond"] + 4.0 * (br["cond"] - br["uncond"]))
        assert torch.equal(den(x, 300, cond), br["guided"])
        # The uncond branch is the pipeline's null condition (zeros for SDXL with force_zeros_for_empty_prompt).
        assert torch.equal(cond.null().tokens, torch.zeros_like(cond.tokens))
        alone = den.predict(x, 300, cond, branch="uncond")
    assert torch.allclose(alone, br["uncond"], atol=1e-5)


def test_batched_and_separate_cfg_agree_and_are_labelled(sdxl):
    pipe, cond = sdxl
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    outs, labels = {}, {}
    for mode in ("batched", "separate"):
        den = sdxl_denoiser(pipe, guidance_scale=3.0, cfg_mode=mode)
        with torch.no_grad(), capture(den, "mid_block") as cap:
            outs[mode] = den.branches(x, 500, cond)
        labels[mode] = sorted((k.branch, k.call) for k in cap.store.keys())
        for branch in ("uncond", "cond"):
            assert cap.store.get("mid_block", branch=branch).shape[0] == 2
    assert labels["batched"] == [("cond", 0), ("uncond", 0)]
    assert labels["separate"] == [("cond", 1), ("uncond", 0)]
    for k in ("uncond", "cond", "guided"):
        assert torch.allclose(outs["batched"][k], outs["separate"][k], atol=1e-4)


def test_empty_conditioning_means_null_condition(tiny_clevr_pipe, sdxl):
    den = tiny_clevr_pipe.denoiser()
    empty = tiny_clevr_pipe.conditioning(torch.zeros(0, 2))
    full = tiny_clevr_pipe.conditioning([[0.3, 0.4]])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(den(x, 100, empty), den.predict(x, 100, full, branch="uncond"))
    pipe, cond = sdxl
    sden = sdxl_denoiser(pipe, guidance_scale=None)
    with torch.no_grad():
        assert torch.equal(sden(x.new_zeros(1, 4, 32, 32), 10, cond.subset([])), sden.predict(x.new_zeros(1, 4, 32, 32), 10, cond, branch="uncond"))


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_score_conversion_recovers_the_noise(tiny_clevr_pipe, ptype):
    """An oracle network that returns the true ε / v / x₀ must give score = −ε/σ exactly."""
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
            ab = den._per_sample(den.alpha_bar(timestep), sample)
            target = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "sample": x0}[ptype]
            return (target + self.w,)

    den = Denoiser(Oracle(), tiny_clevr_pipe.scheduler, prediction_type=ptype)
    x_t = den.add_noise(x0, eps, t)
    cond = Conditioning.from_tokens(torch.zeros(1, 4), [])
    sigma = den.sigma(t).float().reshape(-1, 1, 1, 1)
    assert torch.allclose(den.score(x_t, t, cond), -eps / sigma, rtol=1e-4, atol=1e-4)
    assert torch.allclose(den.to_x0(den(x_t, t, cond), x_t, t), x0, atol=1e-3)


def test_bad_inputs_name_the_problem(tiny_clevr_pipe):
    den = tiny_clevr_pipe.denoiser()
    cond = tiny_clevr_pipe.conditioning([[0.5, 0.5]])
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        den(x[0], 10, cond)
    with pytest.raises(ValueError, match="channels"):
        den(torch.randn(1, 4, 32, 32), 10, cond)
    with pytest.raises(TypeError, match="floating point"):
        den(x.long(), 10, cond)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        den(bad, 10, cond)
    with pytest.raises(ValueError, match="on meta"):
        den(x.to("meta"), 10, cond)
    with pytest.raises(ValueError, match="width 8"):
        den(x, 10, Conditioning.from_tokens(torch.zeros(1, 8), []))
    with pytest.raises(ValueError, match="2 conditionings for a batch of 1"):
        den(x, 10, [cond, cond])
    with pytest.raises(ValueError, match=r"timestep must be a scalar or \(1,\)"):
        den(x, torch.tensor([1, 2, 3]), cond)
    with pytest.raises(ValueError, match="timesteps must lie"):
        den.alpha_bar(5000)
    with pytest.raises(ValueError, match="branch must be"):
        den.predict(x, 10, cond, branch="both")


def test_bf16_model_returns_input_dtype(tiny_clevr_pipe):
    import copy

    unet = copy.deepcopy(tiny_clevr_pipe.unet).to(torch.bfloat16)
    den = Denoiser(unet, tiny_clevr_pipe.scheduler)
    cond = tiny_clevr_pipe.conditioning([[0.5, 0.5]]).to(dtype=torch.bfloat16)
    with torch.no_grad():
        out = den(torch.randn(1, 3, 32, 32), 10, cond)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
