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


class _Affine(torch.nn.Module):
    """A tiny network with the UNet2DConditionModel call signature and a configurable ``config`` attribute."""

    def __init__(self, config):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        if config is not None:
            self.config = config

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None, return_dict=False):
        t = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1, 1, 1, 1)
        tok = encoder_hidden_states
        m = torch.ones(tok.shape[:2]) if encoder_attention_mask is None else encoder_attention_mask.to(tok.dtype)
        mean = (tok * m[..., None]).sum((1, 2)) / (m.sum(1) * tok.shape[2])  # mean over attended tokens
        return (self.w * sample + t / 1000 + mean.reshape(-1, 1, 1, 1),)


class _AttrConfig:
    def __init__(self):
        self.in_channels = 3
        self.sample_size = 8


def _config_kinds():
    import types

    from diffusers.configuration_utils import FrozenDict

    fields = {"in_channels": 3, "sample_size": 8}
    return {
        "dict": dict(fields),
        "frozendict": FrozenDict(fields),
        "namespace": types.SimpleNamespace(**fields),
        "object": _AttrConfig(),
        "none": None,
    }


@pytest.mark.parametrize("kind", ["dict", "frozendict", "namespace", "object", "none"])
def test_any_config_kind_is_a_mapping_and_the_denoiser_works(kind):
    """Attribute-style configs (SimpleNamespace, plain objects) used to fail at first use with ``.get``."""
    den = Denoiser(_Affine(_config_kinds()[kind]), guidance_scale=2.0)
    from collections.abc import Mapping

    assert isinstance(den.config, Mapping)
    if kind == "none":
        assert dict(den.config) == {} and den.in_channels is None
    else:
        assert den.config["sample_size"] == 8 and den.in_channels == 3
        with pytest.raises(ValueError, match="channels"):  # the config is really read: 4 channels refused
            den(torch.zeros(1, 4, 8, 8), 10, Conditioning.from_tokens(torch.zeros(1, 4), []))
    cond = Conditioning.from_tokens(torch.ones(1, 4), [torch.full((4,), 2.0)])
    x = torch.ones(2, 3, 8, 8)
    with torch.no_grad():
        pred = den.predict(x, 100, cond)
        br = den.branches(x, 100, cond)
        score = den.score(x, 100, cond)
    # cond tokens mean (1 + 2) / 2 = 1.5; null tokens mean 1.0
    assert torch.allclose(pred, torch.full_like(x, 0.5 + 0.1 + 1.5))
    assert torch.allclose(br["uncond"], torch.full_like(x, 0.5 + 0.1 + 1.0))
    assert torch.allclose(br["guided"], br["uncond"] + 2.0 * (br["cond"] - br["uncond"]))
    assert torch.allclose(score, -br["guided"] / den.sigma(100).float())
    from interp.metadata import config_hash

    # every kind hashes like the same dict: a namespace and a FrozenDict describe one model the same way
    assert den.metadata()["config_hash"] == ("none" if kind == "none" else config_hash({"in_channels": 3, "sample_size": 8}))


def test_guidance_scale_zero_is_unconditional_not_one():
    den = Denoiser(_Affine(None), guidance_scale=0.0)
    cond = Conditioning.from_tokens(torch.ones(1, 4), [torch.full((4,), 2.0)])
    x = torch.ones(1, 3, 8, 8)
    with torch.no_grad():
        br = den.branches(x, 100, cond)
        assert torch.equal(br["guided"], br["uncond"]) and not torch.equal(br["cond"], br["uncond"])
        assert torch.equal(den(x, 100, cond), br["uncond"])
