"""Sites on transformers: image / text streams of dual-stream blocks, and patch tokens on their 2-D grid."""

from __future__ import annotations

import pytest
import torch

from interp import Denoiser, Site
from interp.capture import capture, read_activation
from interp.hooks import HookSet
from interp.models import class_conditioning, prompt_conditioning, tiny
from interp.site import spatial_view
from interp.streams import StreamError


@pytest.fixture(scope="module")
def pipes():
    return {f: tiny(f, 0) for f in ("sd3", "flux", "pixart", "dit")}


def _cond(pipe, family, **kw):
    if family == "dit":
        return class_conditioning(pipe, 1)
    with torch.no_grad():
        return prompt_conditioning(pipe, ["a red cube", "a blue sphere"], **kw)


def _raw_output(den, path, x, cond):
    seen = {}
    with HookSet() as hooks, torch.no_grad():
        hooks.forward(dict(den.unet.named_modules())[path], lambda m, a, out: seen.setdefault("out", out) and None)
        den(x, den.timestep(0.5), cond)
    return seen["out"]


@pytest.mark.parametrize("family, block, text_len", [("sd3", "transformer_blocks.0", 333), ("flux", "transformer_blocks.0", 512),
                                                      ("flux", "single_transformer_blocks.0", 512)])
def test_dual_stream_blocks_give_the_image_stream_by_default_and_text_on_request(pipes, family, block, text_len):
    pipe = pipes[family]
    den, cond = Denoiser(pipe), _cond(pipe, family)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    raw = _raw_output(den, block, x, cond)  # (text, image), in diffusers' own order for these blocks
    assert [t.shape[1] for t in raw] == [text_len, 64]
    sites = [Site(block)] + ([Site(block + ".norm", stream="text")] if "single" in block else [])
    with torch.no_grad(), capture(den, sites) as cap:
        den(x, den.timestep(0.5), cond)
    assert torch.equal(cap.store.get(block), raw[1])  # the image stream, not the first tensor (text)
    with torch.no_grad(), capture(den, Site(block, stream="text")) as cap_text:
        den(x, den.timestep(0.5), cond)
    assert torch.equal(cap_text.store.get(block), raw[0])
    if "single" in block:  # inside a single-stream block the streams are concatenated [text; image]
        joint = _raw_output(den, block + ".norm", x, cond)[0]
        assert torch.equal(cap.store.get(block + ".norm"), joint[:, :text_len])
    # the differentiable read gives the image stream too
    with torch.no_grad():
        assert torch.equal(read_activation(den, block, cond, x_t=x, t=0.5), raw[1])


def test_streams_of_equal_length_are_refused_not_guessed(pipes):
    pipe = pipes["flux"]
    den = Denoiser(pipe)
    cond = _cond(pipe, "flux", max_sequence_length=64)  # 64 text tokens, 64 image tokens (8 × 8 patches)
    with pytest.raises(StreamError, match="cannot be told apart by length"), capture(den, "transformer_blocks.0"):
        with torch.no_grad():
            den(torch.zeros(1, 4, 16, 16), den.timestep(0.5), cond)


def test_a_text_stream_where_there_is_none_is_refused(pipes, tiny_clevr_pipe):
    with pytest.raises(ValueError, match="Site.stream must be 'image', 'text' or None"):
        Site("transformer_blocks.0", stream="txt")
    den = tiny_clevr_pipe.denoiser()
    with pytest.raises(StreamError, match="no text token stream"), capture(den, Site("mid_block", stream="text")):
        with torch.no_grad():
            den(torch.zeros(1, 3, 32, 32), 10, tiny_clevr_pipe.conditioning([[0.5, 0.5]]))
    sd3 = Denoiser(pipes["sd3"])
    with pytest.raises(StreamError, match="holds no text stream"), capture(sd3, Site("pos_embed", stream="text")):
        with torch.no_grad():
            sd3(torch.zeros(1, 4, 16, 16), sd3.timestep(0.5), _cond(pipes["sd3"], "sd3"))


@pytest.mark.parametrize("family, embed", [("sd3", "pos_embed"), ("flux", "x_embedder"), ("pixart", "pos_embed"),
                                            ("dit", "pos_embed")])
def test_patch_tokens_sit_on_their_grid_like_a_unet_map(pipes, family, embed):
    """A change of one latent pixel moves only its own patch's token; a region selects the same image part."""
    pipe = pipes[family]
    den, cond = Denoiser(pipe), _cond(pipe, family)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, :, 5, 9] += 1.0  # latent row 5, column 9: patch (2, 4) of the 8 × 8 grid
    region = Site(embed, region=(0.25, 0.375, 0.5, 0.625))  # rows 4-5, cols 8-9 of 16: patch (2, 4) exactly
    maps = []
    for inp in (x, y):
        with torch.no_grad(), capture(den, embed) as cap:
            den(inp, den.timestep(0.5), cond)
        maps.append(spatial_view(cap.store.get(embed), (16, 16)))
    changed = (maps[0] - maps[1]).abs().amax(1)[0] > 0
    assert changed.shape == (8, 8) and torch.nonzero(changed).tolist() == [[2, 4]]
    with torch.no_grad(), capture(den, region) as cap_region:
        den(y, den.timestep(0.5), cond)
    assert torch.equal(cap_region.store.get(embed), maps[1][..., 2:3, 4:5])
