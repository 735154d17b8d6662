"""Prompts as sets of conditioners, for every text-conditioned family; class ids for DiT.

:func:`prompt_conditioning` encodes ``sep.join(phrases)`` with the pipeline's *own* encoders (``encode_prompt``)
and gives each phrase the token positions it occupies, in every encoder whose tokens the network reads:

=========  ================================================  =====================================
family     tokens the network reads                          ``added``
=========  ================================================  =====================================
sd15/sd2   CLIP ``(77, D)``                                  —
sdxl       two CLIPs concatenated ``(77, D)``                 pooled ``text_embeds``, ``time_ids``
pixart     T5, the prompt's own tokens (padding removed;      —
           the adapter pads and masks as the pipeline does)
sd3        CLIP ``(77)`` then T5 ``(max_sequence_length)``     ``pooled_projections`` (two CLIPs)
flux       T5 ``(max_sequence_length)``                       ``pooled_projections`` (CLIP)
=========  ================================================  =====================================

``drop(j)`` / ``only(j)`` remove a phrase's *own* tokens from what the network attends to. What that means
depends on the encoder, and the difference is real:

* **CLIP is causal**: the tokens after a phrase, and the pooled embedding, still carry it;
* **T5 is bidirectional**: *every* token of the prompt (the other phrases', EOS, padding) is computed with the
  phrase in view, so removing its own tokens leaves its trace spread over the whole sequence. A T5 ablation
  therefore measures "the network without the phrase's own tokens", not "the prompt without the phrase";
  encode the shorter prompt for the latter (it changes every other token too).

The pooled embeddings (SDXL, SD3, Flux) are kept by ``drop`` / ``only``: they summarise the whole prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from interp.adapters import DIT_NULL_CLASS
from interp.conditioning import Conditioning

#: Pipeline class name → family (the text families; DiT is class-conditional).
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "DiTPipeline": "dit",
}


def pipeline_family(pipe: Any) -> str:
    """The family of a diffusers pipeline object (by its class, through the MRO).

    Raises:
        TypeError: a pipeline of no supported family (the supported classes are listed).
    """
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINE_FAMILIES:
            return PIPELINE_FAMILIES[cls.__name__]
    raise TypeError(
        f"{type(pipe).__name__} is not a supported pipeline; supported: {', '.join(sorted(PIPELINE_FAMILIES))}"
    )


def phrase_token_spans(tokenizer: Any, phrases: Sequence[str], sep: str, *, offset: int) -> list[tuple[int, int]]:
    """Token spans ``[start, stop)`` of each phrase of ``sep.join(phrases)``, shifted by ``offset`` (BOS: 1).

    A phrase's span is the difference of the token counts of the prompt's prefixes; the counts are only exact
    when tokenising the whole prompt starts with the same ids as tokenising each prefix, which is checked.

    Raises:
        ValueError: a phrase boundary that falls inside a token (names the phrase and the fix).
    """
    from interp.models.sdxl import check_phrases

    phrases = check_phrases(phrases)
    full = tokenizer(sep.join(phrases), add_special_tokens=False).input_ids
    spans, prefix = [], ""
    for i, phrase in enumerate(phrases):
        lead = tokenizer(prefix + sep, add_special_tokens=False).input_ids if i else []
        prefix = prefix + (sep if i else "") + phrase
        ids = tokenizer(prefix, add_special_tokens=False).input_ids
        if full[: len(ids)] != ids or full[: len(lead)] != lead or len(lead) >= len(ids):
            raise ValueError(
                f"phrase {i} ({phrase!r}) does not start and end on token boundaries of the prompt; separate "
                "phrases with punctuation and a space (the default sep=', ')"
            )
        spans.append((offset + len(lead), offset + len(ids)))
    return spans


def _owner(length: int, spans: Sequence[Sequence[tuple[int, int]]]) -> Tensor:
    owner = torch.full((length,), -1, dtype=torch.long)
    for group in spans:
        for j, (a, b) in enumerate(group):
            owner[a:b] = j
    return owner


def _check_fits(spans: list[tuple[int, int]], limit: int, what: str) -> None:
    if spans and spans[-1][1] > limit:
        raise ValueError(f"the prompt needs {spans[-1][1]} {what} positions, over the limit of {limit}; shorten it")


def prompt_conditioning(
    pipe: Any,
    phrases: Sequence[str],
    *,
    sep: str = ", ",
    negative_prompt: str | None = None,
    max_sequence_length: int | None = None,
    **kwargs: Any,
) -> Conditioning:
    """Encode ``sep.join(phrases)`` with the pipeline's own encoders; one conditioner per phrase.

    Works for SD1.5/SD2, SDXL, PixArt, SD3 and Flux pipelines (see the module docstring for the tokens of each
    and the T5 caveat). The null condition is the pipeline's own unconditional embedding (its negative prompt,
    default empty). ``max_sequence_length`` is the T5 length, as in the pipeline's call (default: the
    pipeline's). Other keywords go to the SDXL encoder (``height``, ``width``).

    Raises:
        TypeError: a bare string for ``phrases``, or a pipeline that is not text-conditioned (DiT: use
            :func:`class_conditioning`).
    """
    from interp.models.sdxl import check_phrases

    family = pipeline_family(pipe)
    if family == "sdxl":
        from interp.models.sdxl import prompt_conditioning as sdxl_prompt_conditioning

        return sdxl_prompt_conditioning(pipe, phrases, sep=sep, negative_prompt=negative_prompt, **kwargs)
    if kwargs:
        raise TypeError(f"prompt_conditioning() got unexpected keyword(s) {sorted(kwargs)} for a {family} pipeline")
    if family == "dit":
        raise TypeError("a DiT pipeline is class-conditional: use interp.models.class_conditioning(pipe, label)")
    phrases = check_phrases(phrases)
    prompt = sep.join(phrases)
    network = getattr(pipe, "unet", None) or pipe.transformer
    device = next(network.parameters()).device
    ctx = torch.no_grad() if not torch.is_grad_enabled() else contextlib.nullcontext()
    labels = tuple(phrases)
    if family == "sd":
        from interp.models.sdxl import phrase_spans

        spans = phrase_spans(pipe.tokenizer, phrases, sep)
        with ctx:
            pe, npe = pipe.encode_prompt(prompt, device, 1, True, negative_prompt)
        return Conditioning(tokens=pe[0], owner=_owner(pe.shape[1], [spans]), labels=labels, null_tokens=npe[0])
    if family == "pixart":
        L = max_sequence_length or 120
        spans = phrase_token_spans(pipe.tokenizer, phrases, sep, offset=0)
        _check_fits(spans, L - 1, "T5 token")
        with ctx:
            pe, pm, npe, npm = pipe.encode_prompt(prompt, True, negative_prompt=negative_prompt or "", device=device,
                                                  clean_caption=False, max_sequence_length=L)
        n, nn_ = int(pm[0].sum()), int(npm[0].sum())
        # Only the prompt's own tokens (with EOS); the PixArt adapter pads and masks them as the pipeline does.
        return Conditioning(tokens=pe[0, :n], owner=_owner(n, [spans]), labels=labels, null_tokens=npe[0, :nn_])
    if family == "sd3":
        L = max_sequence_length or 256
        from interp.models.sdxl import phrase_spans

        groups = [phrase_spans(pipe.tokenizer, phrases, sep)]
        if pipe.text_encoder_3 is not None:  # without T5 the pipeline feeds zeros there: no phrase owns them
            t5 = phrase_token_spans(pipe.tokenizer_3, phrases, sep, offset=pipe.tokenizer_max_length)
            _check_fits(t5, pipe.tokenizer_max_length + L - 1, "CLIP + T5 token")
            groups.append(t5)
        with ctx:
            pe, npe, pooled, npooled = pipe.encode_prompt(prompt, None, None, device=device,
                                                          do_classifier_free_guidance=True,
                                                          negative_prompt=negative_prompt or "", max_sequence_length=L)
        return Conditioning(tokens=pe[0], owner=_owner(pe.shape[1], groups), labels=labels,
                            added={"pooled_projections": pooled[0]}, null_tokens=npe[0],
                            null_added={"pooled_projections": npooled[0]})
    # flux: T5 tokens, CLIP pooled; its null condition is the negative prompt's encoding (true CFG).
    L = max_sequence_length or 512
    spans = phrase_token_spans(pipe.tokenizer_2, phrases, sep, offset=0)
    _check_fits(spans, L - 1, "T5 token")
    with ctx:
        pe, pooled, _ = pipe.encode_prompt(prompt, None, device=device, max_sequence_length=L)
        npe, npooled, _ = pipe.encode_prompt(negative_prompt or "", None, device=device, max_sequence_length=L)
    return Conditioning(tokens=pe[0], owner=_owner(pe.shape[1], [spans]), labels=labels,
                        added={"pooled_projections": pooled[0]}, null_tokens=npe[0],
                        null_added={"pooled_projections": npooled[0]})




#: The embedding keywords each family's pipeline call takes (``from_embeddings`` takes the same names).
EMBEDDING_KEYWORDS = {
    "sd": ("prompt_embeds", "negative_prompt_embeds"),
    "sdxl": ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
    "pixart": ("prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask", "negative_prompt_attention_mask"),
    "sd3": ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
    "flux": ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
}


def _one(name: str, value: Any, dims: int) -> Tensor:
    """A batch-of-one embedding as the pipelines take it, ``(1, ...)``, returned without the batch axis."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dim() != dims or value.shape[0] != 1:
        raise ValueError(f"{name} must be one prompt's embedding ({dims}-D with batch 1, as the pipeline takes it), "
                         f"got {tuple(value.shape)}; pass one prompt at a time")
    return value[0]


def conditioning_from_embeddings(
    pipe: Any,
    *,
    spans: Sequence[tuple[int, int]] | None = None,
    labels: Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    **embeddings: Tensor,
) -> Conditioning:
    """A :class:`Conditioning` from embeddings a user already has, named as in the family's pipeline call.

    ``embeddings`` are the keywords of :data:`EMBEDDING_KEYWORDS` for the pipeline's family, each with batch 1
    (``prompt_embeds (1, L, D)``, ``pooled_prompt_embeds (1, P)``, PixArt's ``prompt_attention_mask (1, L)``).
    The negative (unconditional) embeddings are required: they are the family's null condition (what
    ``drop`` of every conditioner, and the CFG branch ``uncond``, feed the network). ``spans``: the token range
    ``[start, stop)`` of each conditioner in ``prompt_embeds`` (``labels`` name them); by default the whole prompt
    is one conditioner, ``"prompt"`` (dropping it gives the negative embedding). On PixArt the tokens are the
    prompt's own (the attention mask's), as :func:`prompt_conditioning` keeps them, and spans index those. SDXL's
    ``time_ids`` are built as its pipeline builds them for ``height`` × ``width`` (default resolution).

    Raises:
        TypeError: an unknown keyword for the family (lists the family's keywords), a DiT pipeline, a non-tensor.
        ValueError: a missing required embedding, a batch other than 1, spans out of range, overlapping or empty.
    """
    family = pipeline_family(pipe)
    if family == "dit":
        raise TypeError("a DiT pipeline is class-conditional: use interp.models.class_conditioning(pipe, label)")
    allowed = EMBEDDING_KEYWORDS[family]
    unknown = sorted(set(embeddings) - set(allowed))
    if unknown:
        raise TypeError(f"from_embeddings() got {unknown} for a {family} pipeline; its keywords are {list(allowed)}")
    missing = [k for k in allowed if embeddings.get(k) is None]
    if missing:
        raise ValueError(f"from_embeddings() on a {family} pipeline needs {missing} as well (the negative embeddings are "
                         "the null condition); get them all from pipe.encode_prompt(..., do_classifier_free_guidance=True)")
    tokens = _one("prompt_embeds", embeddings["prompt_embeds"], 3)
    null = _one("negative_prompt_embeds", embeddings["negative_prompt_embeds"], 3)
    if null.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"negative_prompt_embeds has width {null.shape[-1]}, prompt_embeds {tokens.shape[-1]}: "
                         "they must come from the same encoders")
    added: dict[str, Tensor] = {}
    null_added: dict[str, Tensor] = {}
    if family == "pixart":  # only the prompt's own tokens; the adapter pads and masks them as the pipeline does
        n = int(_one("prompt_attention_mask", embeddings["prompt_attention_mask"], 2).sum())
        n0 = int(_one("negative_prompt_attention_mask", embeddings["negative_prompt_attention_mask"], 2).sum())
        tokens, null = tokens[:n], null[:n0]
    if family in ("sdxl", "sd3", "flux"):
        pooled = _one("pooled_prompt_embeds", embeddings["pooled_prompt_embeds"], 2)
        npooled = _one("negative_pooled_prompt_embeds", embeddings["negative_pooled_prompt_embeds"], 2)
        key = "text_embeds" if family == "sdxl" else "pooled_projections"
        added[key], null_added[key] = pooled, npooled
    if family == "sdxl":
        from interp.models.sdxl import sdxl_time_ids

        added["time_ids"] = null_added["time_ids"] = sdxl_time_ids(pipe, tokens.dtype, height=height, width=width)
    elif height is not None or width is not None:
        raise TypeError(f"height / width set SDXL's time_ids; a {family} pipeline takes none")
    L = tokens.shape[0]
    if spans is None:
        if labels is not None:
            raise ValueError("labels name the conditioners of spans=; pass spans too (or neither: one 'prompt')")
        spans, labels = [(0, L)], ("prompt",)
    spans = [tuple(int(v) for v in span) for span in spans]
    labels = tuple(labels) if labels is not None else tuple(f"c{j}" for j in range(len(spans)))
    if isinstance(labels, str) or len(labels) != len(spans):
        raise ValueError(f"{len(labels)} labels for {len(spans)} spans: pass one label per span")
    for j, (a, b) in enumerate(spans):
        if not 0 <= a < b <= L:
            raise ValueError(f"spans[{j}] = ({a}, {b}) must satisfy 0 <= start < stop <= {L} (the prompt's tokens)")
    ordered = sorted(spans)
    for (a0, b0), (a1, b1) in zip(ordered, ordered[1:]):
        if a1 < b0:
            raise ValueError(f"spans ({a0}, {b0}) and ({a1}, {b1}) overlap: a token belongs to one conditioner")
    return Conditioning(tokens=tokens, owner=_owner(L, [spans]), labels=labels, added=added, null_tokens=null,
                        null_added=null_added or None)


def class_conditioning(pipe: Any, label: str | int) -> Conditioning:
    """A DiT conditioning: one conditioner, the class ``label`` (a name of ``pipe.labels`` or an id).

    The token ``(1, 1)`` holds the class id (the DiT adapter reads it back as an integer); the null condition is
    the pipeline's null class 1000. Class ids are discrete: ablation (``drop(0)`` is the null class) is
    meaningful, a derivative with respect to the token is not.

    Raises:
        ValueError: an unknown label name (lists a few known ones) or an id out of range.
    """
    if pipeline_family(pipe) != "dit":
        raise TypeError(f"class_conditioning is for DiT pipelines; use prompt_conditioning for {type(pipe).__name__}")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise TypeError(f"label must be a class name or id, got {type(label).__name__} {label!r}")
    if isinstance(label, str):
        known = getattr(pipe, "labels", {}) or {}
        if label not in known:
            raise ValueError(f"unknown class {label!r}; known classes include {sorted(known)[:8]}")
        idx, name = int(known[label]), label
    else:
        n = pipe.transformer.config.num_embeds_ada_norm
        if not 0 <= label < n:
            raise ValueError(f"class id {label} out of range: 0..{n - 1}")
        idx, name = label, str(label)
    dtype = pipe.transformer.dtype
    return Conditioning(tokens=torch.tensor([[float(idx)]], dtype=dtype), owner=torch.zeros(1, dtype=torch.long),
                        labels=(name,), null_tokens=torch.tensor([[float(DIT_NULL_CLASS)]], dtype=dtype))
