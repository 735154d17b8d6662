"""``Conditioning.from_embeddings``: embeddings a user already has, under the family pipeline's own keyword names.

Ground truth: the family's own pipeline called with the same embeddings (``prompt_embeds=...``) must give the
latents that ``interp.sample`` gives through the Denoiser with the conditioning built from them, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from interp import Conditioning, Denoiser, sample
from interp.models import tiny

TEXT_FAMILIES = ("sd15", "sd2", "sdxl", "pixart", "sd3", "flux")
PROMPT = "a red cube, a blue sphere"


@pytest.fixture(scope="module")
def pipes():
    return {f: tiny(f, 0) for f in TEXT_FAMILIES}


def _embeddings(pipe, family: str) -> dict[str, torch.Tensor]:
    """The family's embeddings of PROMPT (and of the empty negative prompt), named as its pipeline call names them."""
    with torch.no_grad():  # as the pipelines encode
        if family in ("sd15", "sd2"):
            pe, npe = pipe.encode_prompt(PROMPT, "cpu", 1, True, None)
            return dict(prompt_embeds=pe, negative_prompt_embeds=npe)
        if family == "sdxl":
            pe, npe, pooled, npooled = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True)
        elif family == "pixart":
            pe, pm, npe, npm = pipe.encode_prompt(PROMPT, True, negative_prompt="", device="cpu", clean_caption=False,
                                                  max_sequence_length=120)
            return dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=npe,
                        negative_prompt_attention_mask=npm)
        elif family == "sd3":
            pe, npe, pooled, npooled = pipe.encode_prompt(PROMPT, None, None, device="cpu", do_classifier_free_guidance=True,
                                                          negative_prompt="", max_sequence_length=256)
        else:  # flux: no negative in encode_prompt; the empty prompt's encoding is its null (true CFG)
            pe, pooled, _ = pipe.encode_prompt(PROMPT, None, device="cpu", max_sequence_length=512)
            npe, npooled, _ = pipe.encode_prompt("", None, device="cpu", max_sequence_length=512)
    return dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=npooled)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_sampling_from_embeddings_equals_the_pipeline_given_the_same_embeddings(pipes, family):
    pipe = pipes[family]
    emb = _embeddings(pipe, family)
    size = dict(height=32, width=32) if family == "sdxl" else {}  # SDXL's time_ids follow the resolution
    cond = Conditioning.from_embeddings(pipe, **emb, **size)
    assert cond.labels == ("prompt",) and cond.k == 1
    scale = None if family == "flux" else 4.0  # tiny Flux is guidance-free
    # SDXL's pipeline samples with its own Euler scheduler (interp.sample's default on VP models is DDIM)
    sampler = {"scheduler": pipe.scheduler} if family == "sdxl" else {}
    x = sample(Denoiser(pipe, guidance_scale=scale), cond, shape=(1, 4, 16, 16), num_steps=3, seed=5, **sampler)
    kwargs = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="latent",
                  height=32, width=32)
    if family == "pixart":  # its default negative_prompt="" cannot go with negative_prompt_embeds
        kwargs.update(use_resolution_binning=False, clean_caption=False, negative_prompt=None)
    if scale is not None:
        kwargs["guidance_scale"] = scale
    if family == "flux":  # a guidance-free pipeline takes no negative embeddings
        emb = {k: v for k, v in emb.items() if not k.startswith("negative")}
    ref = pipe(**emb, **kwargs).images
    if family == "flux":
        from diffusers import FluxPipeline

        x = FluxPipeline._pack_latents(x, 1, 4, 16, 16)
    assert torch.equal(x, ref)


def test_spans_make_conditioners_and_dropping_every_one_is_the_negative(pipes):
    pipe = pipes["sd3"]
    emb = _embeddings(pipe, "sd3")
    cond = Conditioning.from_embeddings(pipe, **emb, spans=[(1, 4), (5, 8)], labels=["red cube", "blue sphere"])
    assert cond.k == 2 and cond.owner[1:4].eq(0).all() and cond.owner[5:8].eq(1).all() and cond.owner[0] == -1
    assert torch.equal(cond.tokens, emb["prompt_embeds"][0])
    assert torch.equal(cond.added["pooled_projections"], emb["pooled_prompt_embeds"][0])
    null = cond.drop(0).drop(0).resolved()  # no conditioner left: the null condition is the negative prompt
    assert torch.equal(null.tokens, emb["negative_prompt_embeds"][0])
    assert torch.equal(null.added["pooled_projections"], emb["negative_pooled_prompt_embeds"][0])


def test_pixart_keeps_the_prompts_own_tokens(pipes):
    emb = _embeddings(pipes["pixart"], "pixart")
    cond = Conditioning.from_embeddings(pipes["pixart"], **emb)
    n = int(emb["prompt_attention_mask"].sum())
    assert n < emb["prompt_embeds"].shape[1] and torch.equal(cond.tokens, emb["prompt_embeds"][0, :n])


def test_bad_embeddings_are_refused_naming_the_keyword(pipes):
    pipe = pipes["sd3"]
    emb = _embeddings(pipe, "sd3")
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds"):
        Conditioning.from_embeddings(pipe, **{k: v for k, v in emb.items() if k != "negative_pooled_prompt_embeds"})
    with pytest.raises(TypeError, match=r"prompt_attention_mask.*sd3.*pooled_prompt_embeds"):
        Conditioning.from_embeddings(pipe, **emb, prompt_attention_mask=torch.ones(1, 4))
    with pytest.raises(TypeError, match="prompt_embed"):  # a typo never selects nothing silently
        Conditioning.from_embeddings(pipe, **emb, prompt_embed=emb["prompt_embeds"])
    with pytest.raises(ValueError, match="batch 1"):
        Conditioning.from_embeddings(pipe, **dict(emb, prompt_embeds=emb["prompt_embeds"].repeat(2, 1, 1)))
    with pytest.raises(ValueError, match="overlap"):
        Conditioning.from_embeddings(pipe, **emb, spans=[(1, 5), (4, 8)])
    with pytest.raises(ValueError, match="0 <= start < stop"):
        Conditioning.from_embeddings(pipe, **emb, spans=[(3, 3)])
    with pytest.raises(ValueError, match="labels"):
        Conditioning.from_embeddings(pipe, **emb, spans=[(1, 3)], labels=["a", "b"])
    with pytest.raises(TypeError, match="height / width"):
        Conditioning.from_embeddings(pipe, **emb, height=32)
    with pytest.raises(TypeError, match="class_conditioning"):
        Conditioning.from_embeddings(tiny("dit", 0), prompt_embeds=emb["prompt_embeds"])
