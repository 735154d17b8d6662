"""SDXL: the real loader, a tiny random pipeline of the same architecture, and the full U-Net config.

* :func:`load_sdxl` is the real thing: ``StableDiffusionXLPipeline.from_pretrained`` on a hub id or a
  local folder (offline works from a folder).
* :func:`tiny_sdxl` builds a complete ``StableDiffusionXLPipeline`` from configs with random weights — two
  CLIP text encoders, their tokenizers (built in code, no download), a VAE, an Euler scheduler and an
  SDXL-layout U-Net (``text_time`` added conditioning, cross-attention in every level but the first) —
  so every test runs the real pipeline code end to end on CPU in well under a second.
* :func:`sdxl_unet_config` is the full-size SDXL-base U-Net config, to build the real module tree (on the
  meta device: no memory) where a test needs real module paths.
* :func:`prompt_conditioning` turns a prompt made of phrases into a :class:`~interp.Conditioning` with
  one conditioner per phrase (its token span), through the pipeline's own encoders.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from interp.conditioning import Conditioning
from interp.validation import check_int

SDXL_BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"


def sdxl_unet_config() -> dict[str, Any]:
    """The U-Net config of SDXL-base 1.0 (2.6B parameters)."""
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=False,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        upcast_attention=False,
        resnet_time_scale_shift="default",
    )


def sdxl_unet_meta() -> torch.nn.Module:
    """The full-size SDXL U-Net module tree on the meta device (no weights, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**sdxl_unet_config())


def load_sdxl(
    id_or_path: str = SDXL_BASE_ID,
    *,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cuda",
    variant: str | None = None,
    **kwargs: Any,
):
    """Load a real SDXL pipeline with ``StableDiffusionXLPipeline.from_pretrained``.

    Args:
        id_or_path: a hub id (needs network, or a populated cache) or a local folder saved with
            ``save_pretrained`` (works offline).
        dtype: weights dtype (fp16 on GPU; use float32 on CPU).
        device: where to put the pipeline.
        variant: weight file variant, e.g. ``"fp16"`` for the hub's half-precision files.
    """
    from diffusers import StableDiffusionXLPipeline

    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            id_or_path, dtype=dtype, variant=variant, use_safetensors=True, **kwargs
        )
    except (OSError, ValueError) as err:
        raise OSError(
            f"could not load SDXL from {id_or_path!r}: {err}\n"
            "Pass a local folder saved with pipe.save_pretrained(...), or a hub id with network access "
            "(HF_HUB_OFFLINE=1 only finds models already in the cache)."
        ) from err
    from interp.models.alignment import realign_pipeline_

    return realign_pipeline_(pipe.to(device))


def _offline_clip_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer built in code: byte-level symbols plus a few merges, no download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    # A few merges so common words become one or two tokens (spans are then not just characters).
    for word in ("a", "the", "cat", "dog", "red", "blue", "cube", "sphere", "watercolor", "photo", "of", "in", "style"):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in vocab_list:
                vocab_list.append(merged)
            pieces = [merged] + pieces[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token="<|endoftext|>")


def tiny_sdxl(seed: int = 0, *, sample_size: int = 32):
    """A complete SDXL-architecture pipeline with random weights, built offline (a 2.0M-parameter U-Net).

    Deterministic by ``seed``; identical after ``save_pretrained`` / ``from_pretrained``.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=sample_size * 2,
    )
    text_cfg = dict(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        hidden_act="gelu",
        projection_dim=32,
    )
    tokenizer = _offline_clip_tokenizer()
    text_cfg.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=_offline_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_phrases(phrases: object) -> list[str]:
    """``phrases`` as a non-empty list of non-empty strings, or a clear error.

    A bare string is refused: iterating it would make one conditioner per *character*.
    """
    if isinstance(phrases, str):
        raise TypeError(
            f"phrases must be a list of phrases, one conditioner each, got the string {phrases!r}; "
            f"pass a list of phrases, e.g. [{phrases!r}]"
        )
    if not isinstance(phrases, Sequence):
        raise TypeError(f"phrases must be a list of strings, got {type(phrases).__name__}")
    out = list(phrases)
    if not out:
        raise ValueError("a prompt conditioning needs at least one phrase; use .null() for the null condition")
    for i, phrase in enumerate(out):
        if not isinstance(phrase, str):
            raise TypeError(f"phrases[{i}] must be a string, got {type(phrase).__name__} {phrase!r}")
        if not phrase.strip():
            raise ValueError(f"phrases[{i}] is empty ({phrase!r}): an empty phrase owns no token; remove it")
    return out


def phrase_spans(tokenizer: Any, phrases: Sequence[str], sep: str = ", ") -> list[tuple[int, int]]:
    """Token spans ``[start, stop)`` of each phrase in ``sep.join(phrases)`` (position 0 is BOS).

    CLIP's BPE works word by word, so the token count of a prefix that ends at a word boundary is exact (checked:
    :func:`interp.models.prompts.phrase_token_spans`).
    """
    from interp.models.prompts import phrase_token_spans

    if not isinstance(sep, str):
        raise TypeError(f"sep must be a string, got {type(sep).__name__}")
    spans = phrase_token_spans(tokenizer, phrases, sep, offset=1)
    limit = tokenizer.model_max_length - 1
    if spans and spans[-1][1] > limit:
        raise ValueError(f"the prompt is {spans[-1][1] + 1} tokens long, over CLIP's limit of {limit + 1}; shorten it")
    return spans


def sdxl_time_ids(pipe: Any, dtype: torch.dtype, *, height: int | None = None, width: int | None = None) -> Tensor:
    """SDXL's ``time_ids (6,)`` as its pipeline builds them: original and target size ``(height, width)`` (default:
    the pipeline's default resolution), crop ``(0, 0)``."""
    h = height or pipe.default_sample_size * pipe.vae_scale_factor
    w = width or pipe.default_sample_size * pipe.vae_scale_factor
    proj_dim = pipe.text_encoder_2.config.projection_dim
    return pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=dtype, text_encoder_projection_dim=proj_dim)[0]


def prompt_conditioning(
    pipe: Any,
    phrases: Sequence[str],
    *,
    sep: str = ", ",
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
) -> Conditioning:
    """Encode ``sep.join(phrases)`` with the pipeline's own text encoders; one conditioner per phrase.

    The tokens are SDXL's ``prompt_embeds`` ``(77, 2048)`` (both encoders' penultimate layers, concatenated);
    a phrase owns the positions of its BPE tokens. BOS, separators, EOS and padding are context tokens.
    ``added`` holds ``text_embeds`` (pooled) and ``time_ids``; the null condition is the pipeline's
    unconditional embedding (zeros when ``force_zeros_for_empty_prompt``, else the negative prompt's).

    Note: CLIP is causal, so tokens after a phrase (and the pooled embedding) still carry it after
    ``drop(j)``; drop/only mask a phrase's *own* tokens out of the U-Net's cross-attention.
    """
    phrases = check_phrases(phrases)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            check_int(name, value, minimum=1)
    prompt = sep.join(phrases)
    spans = phrase_spans(pipe.tokenizer, phrases, sep)
    ctx = torch.no_grad() if not torch.is_grad_enabled() else contextlib.nullcontext()
    with ctx:
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt,
            device=pipe.unet.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt,
        )
    time_ids = sdxl_time_ids(pipe, pe.dtype, height=height, width=width)
    owner = torch.full((pe.shape[1],), -1, dtype=torch.long)
    for j, (a, b) in enumerate(spans):
        owner[a:b] = j
    return Conditioning(
        tokens=pe[0],
        owner=owner,
        labels=tuple(phrases),
        added={"text_embeds": pooled[0], "time_ids": time_ids},
        null_tokens=npe[0],
        null_added={"text_embeds": npooled[0], "time_ids": time_ids},
    )


def sdxl_denoiser(pipe: Any, *, guidance_scale: float | None = 5.0, **kwargs: Any):
    """A :class:`~interp.Denoiser` over an SDXL pipeline's U-Net and scheduler."""
    from interp.denoiser import Denoiser

    return Denoiser(pipe.unet, pipe.scheduler, guidance_scale=guidance_scale, name=kwargs.pop("name", "sdxl"), **kwargs)


def tensor_summary(t: Tensor) -> str:
    """One-line description of a tensor (for error messages and logs)."""
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"
