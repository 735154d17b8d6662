"""Bad input to the nouns (Denoiser, Conditioning, encoders, prompts, sampler) gets one clear error naming the argument.

Each case here was accepted (or failed later with an unrelated message) before the substrate checks.
"""

from __future__ import annotations

import math

import pytest
import torch

from interp import Conditioning, ConditioningBatch, Denoiser, sample
from interp.models import prompt_conditioning


@pytest.fixture(scope="module")
def clevr(tiny_clevr_pipe):
    pipe = tiny_clevr_pipe
    return pipe, pipe.denoiser(), pipe.conditioning([[0.3, 0.4], [0.7, 0.6]])


# ----------------------------------------------------------------------------- Denoiser construction


def test_forward_without_encoder_hidden_states_is_refused_at_construction():
    class TwoArgs(torch.nn.Module):
        def forward(self, x, t):
            return x

    with pytest.raises(TypeError, match="missing parameter.*encoder_hidden_states"):
        Denoiser(TwoArgs())

    class OneArg(torch.nn.Module):
        def forward(self, sample):
            return sample

    with pytest.raises(TypeError, match="timestep, encoder_hidden_states"):
        Denoiser(OneArg())


def test_unreadable_config_is_refused_at_construction():
    class Slotted:
        __slots__ = ("in_channels",)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Slotted()

        def forward(self, sample, timestep, encoder_hidden_states):
            return sample

    with pytest.raises(TypeError, match="config"):
        Denoiser(Net())


def test_padded_batch_on_a_network_without_mask_names_the_parameter():
    class NoMask(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states):
            return (sample,)

    den = Denoiser(NoMask())
    short = Conditioning.from_tokens(torch.zeros(1, 4), [])
    long = Conditioning.from_tokens(torch.zeros(1, 4), [torch.zeros(4)])
    with pytest.raises(TypeError, match="encoder_attention_mask"):
        den(torch.zeros(2, 3, 4, 4), 10, [short, long])


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_bad_guidance_scale_is_refused(clevr, scale):
    pipe, den, cond = clevr
    with pytest.raises(ValueError, match="guidance_scale"):
        Denoiser(pipe.unet, pipe.scheduler, guidance_scale=scale)
    with pytest.raises(ValueError, match="guidance_scale"):
        den(torch.zeros(1, 3, 32, 32), 10, cond, guidance_scale=scale)
    with pytest.raises(ValueError, match="guidance_scale"):
        den.branches(torch.zeros(1, 3, 32, 32), 10, cond, guidance_scale=scale)


# ----------------------------------------------------------------------------- timesteps


_METHODS = {
    "predict": lambda den, x, ts, c: den.predict(x, ts, c),
    "call": lambda den, x, ts, c: den(x, ts, c),
    "branches": lambda den, x, ts, c: den.branches(x, ts, c),
    "score": lambda den, x, ts, c: den.score(x, ts, c),
}


@pytest.mark.parametrize("method", sorted(_METHODS))
@pytest.mark.parametrize(
    "timestep, pattern",
    [
        (-1, r"timestep must lie in \[0, 999\]"),
        (5000, r"timestep must lie in \[0, 999\]"),
        (999.5, r"timestep must lie in \[0, 999\]"),
        (0.5, r"timestep 0.5 looks like a noise fraction; pass den.timestep\(0.5\)"),
        (float("nan"), "timestep contains NaN"),
        (float("inf"), "timestep contains NaN"),
        (torch.tensor([10.0, float("nan")]), "timestep contains NaN"),
        (torch.tensor(0.25), r"den.timestep\(0.25\)"),
    ],
)
def test_bad_timesteps_are_refused(clevr, method, timestep, pattern):
    _, den, cond = clevr
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=pattern):
        _METHODS[method](den, x, timestep, cond)


def test_bool_timestep_is_a_type_error(clevr):
    _, den, cond = clevr
    with pytest.raises(TypeError, match="timestep"):
        den(torch.zeros(1, 3, 32, 32), True, cond)


def test_valid_timesteps_still_work(clevr):
    """Integers, integer-valued floats, fractional timesteps >= 1 (Euler) and per-sample tensors pass."""
    _, den, cond = clevr
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = den(x, 0, cond)
        b = den(x, 0.0, cond)
        den(x, 1, cond)
        den(x, 437.25, cond)
        den(x, 999, cond)
        den(x, torch.tensor([3, 999]), cond)
    assert torch.equal(a, b)


def test_timestep_is_checked_inside_torch_func_transforms(clevr):
    """check_finite skips traced tensors; the timestep check reads the plain value, so it still fires."""
    _, den, cond = clevr
    xs = torch.zeros(2, 1, 3, 32, 32)
    with pytest.raises(ValueError, match="looks like a noise fraction"):
        torch.func.vmap(lambda x: den(x, 0.5, cond))(xs)
    with pytest.raises(ValueError, match=r"timestep must lie"):
        torch.func.jacrev(lambda x: den(x, 1000, cond).sum())(xs[0])


@pytest.mark.parametrize("fraction", [float("nan"), float("inf"), -0.1, 1.5])
def test_fraction_converter_refuses_nan_and_out_of_range(clevr, fraction):
    _, den, _ = clevr
    with pytest.raises(ValueError, match="fraction"):
        den.timestep(fraction)


def test_alpha_bar_refuses_nan(clevr):
    _, den, _ = clevr
    with pytest.raises(ValueError, match="timestep contains NaN"):
        den.alpha_bar(float("nan"))


# ----------------------------------------------------------------------------- CLEVR locations


def _encoders(tiny_clevr_pipe):
    from interp.models.clevr_colour import ColourLocationEncoder
    from interp.models.clevr_local import LocatedLocationEncoder

    torch.manual_seed(0)
    return {
        "plain": (tiny_clevr_pipe.location_encoder, {}),
        "colour": (ColourLocationEncoder(dim=16, hidden=16), {"colours": ["red", "blue"]}),
        "local": (LocatedLocationEncoder(dim=16, hidden=16), {}),
    }


@pytest.mark.parametrize("kind", ["plain", "colour", "local"])
@pytest.mark.parametrize("bad", [1.5, -0.01, float("nan"), float("inf")])
def test_encoders_refuse_bad_locations(tiny_clevr_pipe, kind, bad):
    enc, attrs = _encoders(tiny_clevr_pipe)[kind]
    with pytest.raises(ValueError, match="locations"):
        enc.conditioning([[0.5, 0.5], [bad, 0.2]], **attrs)
    batch = torch.tensor([[[0.5, 0.5], [bad, 0.2]]])
    extra = {"colours": torch.tensor([[1, 2]])} if kind == "colour" else {}
    with torch.no_grad(), pytest.raises(ValueError, match="locations"):
        enc(batch, None, **extra)
    # a padded slot (mask False) may hold anything: the training loader pads with zeros, others may not
    with torch.no_grad():
        tokens, mask = enc(batch, torch.tensor([[True, False]]), **extra)
    assert tokens.shape[:2] == (1, 3) and mask.tolist() == [[True, True, False]]


@pytest.mark.parametrize("kind", ["plain", "colour", "local"])
def test_float64_locations_keep_their_precision(tiny_clevr_pipe, kind):
    """Conditioning.locations keeps the caller's float64 (probes measure distances); tokens follow the model."""
    enc, attrs = _encoders(tiny_clevr_pipe)[kind]
    loc = torch.tensor([[0.1234567890123, 0.5], [0.75, 0.987654321012]], dtype=torch.float64)
    with torch.no_grad():
        c = enc.conditioning(loc, **attrs)
        c32 = enc.conditioning(loc.float(), **attrs)
    assert c.locations.dtype == torch.float64 and torch.equal(c.locations, loc)
    assert c.tokens.dtype == torch.float32 and torch.equal(c.tokens, c32.tokens)
    assert c32.locations.dtype == torch.float32


def test_encoder_batch_shapes_are_checked(tiny_clevr_pipe):
    enc = tiny_clevr_pipe.location_encoder
    with pytest.raises(ValueError, match=r"locations must be a padded batch \(B, K, 2\)"):
        enc(torch.rand(3, 2))
    with pytest.raises(TypeError, match="mask must be a bool"):
        enc(torch.rand(1, 2, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"mask must be \(B, K\)"):
        enc(torch.rand(1, 2, 2), torch.ones(1, 3, dtype=torch.bool))


def test_colour_arguments_are_checked(tiny_clevr_pipe):
    enc, _ = _encoders(tiny_clevr_pipe)["colour"]
    with pytest.raises(TypeError, match=r"colours must be a list.*\['red'\]"):
        enc.conditioning([[0.5, 0.5]], colours="red")
    with pytest.raises(TypeError, match="colours must be names or integer indices"):
        enc.conditioning([[0.5, 0.5]], colours=[1.5])
    with pytest.raises(ValueError, match="colours must be a \\(1, 2\\) integer tensor"):
        enc(torch.rand(1, 2, 2), None, torch.tensor([1, 2]))


def test_conditioning_refuses_bad_locations():
    with pytest.raises(ValueError, match="Conditioning.locations must lie in"):
        Conditioning.from_tokens(torch.zeros(1, 4), [torch.zeros(4)], locations=[[1.5, 0.5]])
    with pytest.raises(ValueError, match="Conditioning.locations contain NaN"):
        Conditioning.from_tokens(torch.zeros(1, 4), [torch.zeros(4)], locations=[[math.nan, 0.5]])
    with pytest.raises(ValueError, match=r"locations must be \(k, 2\)"):
        Conditioning.from_tokens(torch.zeros(1, 4), [torch.zeros(4)], locations=[0.5, 0.5])


# ----------------------------------------------------------------------------- prompts


def test_prompt_conditioning_refuses_a_bare_string(tiny_sdxl_pipe):
    with pytest.raises(TypeError, match=r"pass a list of phrases, e.g. \['a red cube'\]"):
        prompt_conditioning(tiny_sdxl_pipe, "a red cube")


@pytest.mark.parametrize("phrases, error, pattern", [
    ([], ValueError, "at least one phrase"),
    (["a red cube", ""], ValueError, r"phrases\[1\] is empty"),
    (["  "], ValueError, r"phrases\[0\] is empty"),
    (["a red cube", 3], TypeError, r"phrases\[1\] must be a string"),
])
def test_prompt_conditioning_refuses_empty_phrases(tiny_sdxl_pipe, phrases, error, pattern):
    with pytest.raises(error, match=pattern):
        prompt_conditioning(tiny_sdxl_pipe, phrases)


# ----------------------------------------------------------------------------- Conditioning constructors


def _cond(k: int = 3) -> Conditioning:
    return Conditioning.from_tokens(torch.zeros(1, 4), [torch.full((4,), float(j)) for j in range(k)])


def test_conditioning_fields_are_checked():
    c = _cond(2)
    with pytest.raises(TypeError, match="Conditioning.owner must be an integer"):
        Conditioning(tokens=c.tokens, owner=c.owner.float(), labels=c.labels)
    with pytest.raises(TypeError, match="Conditioning.owner must be an integer"):
        Conditioning(tokens=c.tokens, owner=c.owner >= 0, labels=c.labels)
    with pytest.raises(ValueError, match=r"Conditioning.owner must be \(L,\)"):
        Conditioning(tokens=c.tokens, owner=c.owner[None], labels=c.labels)
    with pytest.raises(ValueError, match=r"Conditioning.owner gives conditioner\(s\) \[1\]"):
        Conditioning(tokens=c.tokens, owner=torch.tensor([-1, 0, 0]), labels=c.labels)
    with pytest.raises(TypeError, match="Conditioning.labels must be a sequence"):
        Conditioning(tokens=c.tokens[:2], owner=torch.tensor([-1, 0]), labels="c0")
    with pytest.raises(TypeError, match="Conditioning.tokens must be floating point"):
        Conditioning(tokens=c.tokens.long(), owner=c.owner, labels=c.labels)
    with pytest.raises(TypeError, match="Conditioning.locations must be a"):
        Conditioning(tokens=c.tokens, owner=c.owner, labels=c.labels, locations=[[0.1, 0.1], [0.2, 0.2]])
    with pytest.raises(ValueError, match="Conditioning.null_tokens have width 3"):
        Conditioning(tokens=c.tokens, owner=c.owner, labels=c.labels, null_tokens=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="Conditioning.null_added has keys"):
        Conditioning(tokens=c.tokens, owner=c.owner, labels=c.labels, added={"a": torch.zeros(2)}, null_added={})
    with pytest.raises(ValueError, match="attribute 'colour' has a string"):
        Conditioning(tokens=c.tokens, owner=c.owner, labels=c.labels, attributes={"colour": "rg"})
    with pytest.raises(TypeError, match="labels must be a list"):
        Conditioning.from_tokens(torch.zeros(1, 4), [torch.zeros(4)], labels="c0")
    with pytest.raises(ValueError, match=r"conditioner_tokens\[1\] must be"):
        Conditioning.from_tokens(torch.zeros(1, 4), [torch.zeros(4), torch.zeros(5)])
    with pytest.raises(TypeError, match="conditioner_tokens must be a list"):
        Conditioning.from_tokens(torch.zeros(1, 4), torch.zeros(2, 4))
    assert Conditioning(tokens=c.tokens, owner=c.owner, labels=list(c.labels)).labels == ("c0", "c1")


def test_conditioning_batch_fields_are_checked():
    batch = ConditioningBatch.stack([_cond(2), _cond(1)])
    with pytest.raises(TypeError, match="ConditioningBatch.mask must be a bool"):
        ConditioningBatch(tokens=batch.tokens, mask=batch.mask.float(), added={})
    with pytest.raises(ValueError, match=r"ConditioningBatch.mask must be \(B, L\)"):
        ConditioningBatch(tokens=batch.tokens, mask=batch.mask[:1], added={})
    with pytest.raises(ValueError, match="ConditioningBatch.tokens must be"):
        ConditioningBatch(tokens=batch.tokens[0], mask=batch.mask, added={})
    with pytest.raises(ValueError, match=r"ConditioningBatch.added\['a'\] must have the batch size 2"):
        ConditioningBatch(tokens=batch.tokens, mask=batch.mask, added={"a": torch.zeros(3, 5)})


@pytest.mark.parametrize("call, error, pattern", [
    (lambda c: c.drop(3), IndexError, r"j=3 out of range .* 3 conditioners \(valid: 0..2\)"),
    (lambda c: c.drop(-1), IndexError, r"j=-1 out of range"),
    (lambda c: c.only(7), IndexError, r"j=7 out of range"),
    (lambda c: c.only(True), TypeError, "j must be a conditioner index"),
    (lambda c: c.drop(1.0), TypeError, "j must be a conditioner index"),
    (lambda c: c.subset([0, 5]), IndexError, r"js=5 out of range"),
    (lambda c: c.subset([0, 2, 0]), ValueError, r"js lists conditioner\(s\) \[0\] more than once"),
    (lambda c: c.subset(1), TypeError, r"js must be a sequence.*only\(1\)"),
    (lambda c: c.span(4), IndexError, r"j=4 out of range"),
])
def test_set_algebra_refuses_bad_indices(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(_cond(3))


def test_set_algebra_accepts_integer_like_indices():
    import numpy as np

    c = _cond(3)
    assert c.only(np.int64(2)).labels == ("c2",)
    assert c.subset(torch.tensor([2, 0])).labels == ("c2", "c0")
    assert c.subset(range(2)).labels == ("c0", "c1")


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(num_steps=2.5), TypeError, "num_steps must be an integer"),
    (dict(num_steps=True), TypeError, "num_steps must be an integer, got the bool"),
    (dict(num_steps=-3), ValueError, "num_steps must be >= 1"),
    (dict(num_steps=5000), ValueError, "num_steps=5000 exceeds"),
    (dict(shape=(1, 4, 32, 32)), ValueError, r"shape has 4 channels .* pass shape=\(B, 3, H, W\)"),
    (dict(shape=(1, 3, 32)), ValueError, r"shape must be \(B, C, H, W\)"),
    (dict(shape=(1, 3, 0, 32)), ValueError, r"shape\[2\] must be >= 1"),
    (dict(shape=(3, 3, 32, 32), cond_list=2), ValueError, r"2 conditionings for shape\[0\] = 3"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be finite"),
    (dict(guidance_scale=-2.0), ValueError, "guidance_scale must be >= 0"),
    (dict(scheduler="DDIM "), ValueError, "unknown scheduler"),
    (dict(scheduler=3), TypeError, "scheduler must be one of"),
    (dict(callbacks=print), TypeError, "callbacks must be a list of callables"),
    (dict(callbacks=[None]), TypeError, "callbacks must be a list of callables"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
])
def test_sample_refuses_bad_arguments(clevr, kwargs, error, pattern):
    _, den, cond = clevr
    kwargs = dict(kwargs)
    args = dict(shape=(1, 3, 32, 32), num_steps=2)
    n = kwargs.pop("cond_list", None)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        sample(den, [cond] * n if n else cond, **args)
