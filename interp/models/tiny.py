"""Tiny random pipelines of every supported diffusers family, built offline from configs (tests, demos).

``tiny(family, seed)`` returns the family's own diffusers pipeline class with random weights small enough
that a denoiser forward takes milliseconds on a CPU, and tokenizers built in code (no download):

============  ===============================  =================================================  ==============
family        pipeline                         denoiser                                           schedule
============  ===============================  =================================================  ==============
``sd15``      ``StableDiffusionPipeline``      ``UNet2DConditionModel``, CLIP text                VP, ε
``sd2``       ``StableDiffusionPipeline``      ``UNet2DConditionModel`` (linear proj.), CLIP      VP, v
``sdxl``      ``StableDiffusionXLPipeline``    :func:`interp.models.sdxl.tiny_sdxl`               VP, ε
``pixart``    ``PixArtAlphaPipeline``          ``PixArtTransformer2DModel`` (learned σ), T5       VP, ε
``dit``       ``DiTPipeline``                  ``DiTTransformer2DModel`` (learned σ), class ids   VP, ε
``sd3``       ``StableDiffusion3Pipeline``     ``SD3Transformer2DModel`` (joint blocks), 2 CLIP+T5  flow
``flux``      ``FluxPipeline``                 ``FluxTransformer2DModel`` (packed latents), CLIP+T5  flow
============  ===============================  =================================================  ==============

Same seed, same weights; identical after ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import string
from typing import Any

import torch

FAMILIES = ("sd15", "sd2", "sdxl", "pixart", "dit", "sd3", "flux")

#: Words that become single tokens in the offline tokenizers (so phrases span few tokens, like real ones).
_WORDS = ("a", "the", "cat", "dog", "red", "blue", "cube", "sphere", "watercolor", "photo", "of", "in", "style")


def offline_t5_tokenizer(max_length: int = 32):
    """A T5 (Unigram) tokenizer built in code: whole-word pieces for a few words, then characters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -1.0) for w in _WORDS] + [("▁", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _clip_tokenizer():
    from interp.models.sdxl import _offline_clip_tokenizer

    return _offline_clip_tokenizer()


def _clip_text(tokenizer: Any, seed: int, *, projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=hidden,
        hidden_act="gelu", layer_norm_eps=1e-5, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5_text(tokenizer: Any, seed: int, *, hidden: int = 32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(cfg).eval()


def _vae(seed: int, latent_channels: int = 4, **kwargs: Any):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels, **kwargs,
    )


def _vp_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def _stable_diffusion(seed: int, *, v: bool):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=(2, 4) if v else 8, use_linear_projection=v,
    )
    tok = _clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_vae(seed + 1), text_encoder=_clip_text(tok, seed + 2), tokenizer=tok, unet=unet,
        scheduler=_vp_scheduler("v_prediction" if v else "epsilon"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def _pixart(seed: int):
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, out_channels=8, cross_attention_dim=16, norm_num_groups=8, use_additional_conditions=False,
    )
    tok = offline_t5_tokenizer()
    return PixArtAlphaPipeline(
        tokenizer=tok, text_encoder=_t5_text(tok, seed + 2), vae=_vae(seed + 1), transformer=transformer,
        scheduler=_vp_scheduler(),
    )


def _dit(seed: int):
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, num_embeds_ada_norm=1000, norm_num_groups=8,  # DiTPipeline hard-codes null class 1000
    )
    labels = {i: name for i, name in enumerate(("cat", "dog", "red cube", "blue sphere", "photo", "tree", "car",
                                                 "house", "bird", "boat"))}
    return DiTPipeline(transformer=transformer, vae=_vae(seed + 1), scheduler=_vp_scheduler(), id2label=labels)


def _flow_scheduler(**kwargs: Any):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kwargs)


def _sd3(seed: int):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    tok, tok2, tok3 = _clip_tokenizer(), _clip_tokenizer(), offline_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_flow_scheduler(shift=3.0), vae=_vae(seed + 1, shift_factor=0.0),
        text_encoder=_clip_text(tok, seed + 2, projection=True), tokenizer=tok,
        text_encoder_2=_clip_text(tok2, seed + 3, projection=True), tokenizer_2=tok2,
        text_encoder_3=_t5_text(tok3, seed + 4), tokenizer_3=tok3,
    )


def _flux(seed: int):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    )
    tok, tok2 = _clip_tokenizer(), offline_t5_tokenizer()
    return FluxPipeline(
        scheduler=_flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
        vae=_vae(seed + 1, shift_factor=0.0), text_encoder=_clip_text(tok, seed + 2), tokenizer=tok,
        text_encoder_2=_t5_text(tok2, seed + 3), tokenizer_2=tok2, transformer=transformer,
    )


def tiny(family: str, seed: int = 0):
    """A complete pipeline of ``family`` (one of :data:`FAMILIES`) with random weights, built offline.

    Raises:
        ValueError: an unknown family, listing the known ones.
    """
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    from interp.validation import check_int

    seed = check_int("seed", seed)
    if family == "sdxl":
        from interp.models.sdxl import tiny_sdxl

        return tiny_sdxl(seed)
    build = {"sd15": lambda s: _stable_diffusion(s, v=False), "sd2": lambda s: _stable_diffusion(s, v=True),
             "pixart": _pixart, "dit": _dit, "sd3": _sd3, "flux": _flux}[family]
    pipe = build(seed)
    # Built from a config, a diffusers model is in training mode: DiT's class embedding would then drop labels
    # at random (classifier-free dropout). from_pretrained returns eval mode; so do we.
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
