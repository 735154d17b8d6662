"""Model adapters: how one family's network is called as ``D(x_t, timestep, tokens) -> prediction``.

The :class:`~interp.Denoiser` speaks one language — an image-shaped ``x_t (B, C, H, W)``, a training timestep
and a :class:`~interp.ConditioningBatch` — and every diffusers family calls its network differently: the
U-Nets take ``(sample, timestep, encoder_hidden_states)``; PixArt takes the timestep by keyword, a T5 attention
mask and ``added_cond_kwargs``; DiT takes class ids; SD3 pooled projections; Flux *packed* 2×2 latent patches
with position ids and a timestep divided by 1000; PixArt and DiT return a learned variance in extra output
channels. An adapter is the small, stateless translation for one family, chosen from the network's class
(:func:`adapter_for`). It never wraps the network in another module: hooks and site paths see the family's own
module tree (``transformer_blocks.0.attn``), and every call still goes through the network's own ``forward``.

Each adapter also states its family's **CFG layout** — the order of the branches in the batched call the
family's own pipeline makes (``[uncond; cond]`` for most, ``[cond; uncond]`` for DiT) — so the Denoiser's
batched calls, and the branch labels hooks read, follow the family, and how the family's pipeline **sets its
sampling timesteps** (Flux passes its own σ grid and a resolution-dependent shift), so ``interp.sample``
reproduces the pipeline's trajectory.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from interp.conditioning import ConditioningBatch
from interp.context import batched_cfg_branches as _batched
from interp.streams import TokenLayout

#: The DiT pipeline's null class (``DiTPipeline`` hard-codes it for classifier-free guidance).
DIT_NULL_CLASS = 1000

DISCRETE_TOKENS = (
    "a DiT conditioning is a discrete class id: a derivative with respect to it is undefined. Measure conditioner "
    "effects by ablation (maps=('ablation',); cond.drop(0) is the null class), or differentiate along x_t"
)

#: The positional parameters a U-Net-style network's ``forward`` must take, in this order.
_REQUIRED_POSITIONAL = ("sample", "timestep", "encoder_hidden_states")


def _check_forward_signature(unet: nn.Module) -> inspect.Signature:
    """The signature of ``unet.forward``, refused unless it takes ``(sample, timestep, encoder_hidden_states)``."""
    try:
        sig = inspect.signature(unet.forward)
    except (TypeError, ValueError):  # builtins / C extensions without a signature: nothing to check
        return inspect.Signature(
            [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL), inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
        )
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return sig
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(_REQUIRED_POSITIONAL):
        missing = _REQUIRED_POSITIONAL[len(positional):]
        have = ", ".join(p.name for p in positional) or "nothing"
        raise TypeError(
            f"{type(unet).__name__}.forward takes ({have}) but the Denoiser calls it as "
            f"forward(sample, timestep, encoder_hidden_states, ...): missing parameter(s) {', '.join(missing)}. "
            "Wrap the network in a module with the UNet2DConditionModel call signature"
        )
    return sig


def _first(out: Any) -> Tensor:
    """The prediction tensor of a network's return value (tuple, ``.sample`` output object, or tensor)."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return out if isinstance(out, Tensor) else out.sample


class Adapter:
    """Calls a U-Net-style network ``forward(sample, timestep, encoder_hidden_states, ...)`` (the default).

    Attributes:
        family: a short name (``den.family``).
        cfg_order: the branch order of the family pipeline's batched classifier-free-guidance call.
        token_key: the config key holding the token width the network reads.
        channels_key: the config key holding the channels of ``x_t``.
        discrete_tokens: whether the conditioning tokens hold discrete values (no derivative along them).
    """

    family: ClassVar[str] = "unet"
    cfg_order: ClassVar[tuple[str, str]] = ("uncond", "cond")
    token_key: ClassVar[str] = "cross_attention_dim"
    channels_key: ClassVar[str] = "in_channels"
    #: The tokens encode discrete values (DiT's class id): derivatives along them are undefined.
    discrete_tokens: ClassVar[bool] = False
    #: Conditioning tokens of the family pipeline's default prompt (capture plans size a call with it).
    default_tokens: ClassVar[int] = 77

    def __init__(self, module: nn.Module) -> None:
        params = self.signature(module).parameters
        self._accepts = set(params)
        self._var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.name = type(module).__name__

    def signature(self, module: nn.Module) -> inspect.Signature:
        return _check_forward_signature(module)

    def accepts(self, name: str) -> bool:
        return name in self._accepts or self._var_kw

    # ----------------------------------------------------------------- facts
    def in_channels(self, config: Mapping[str, Any]) -> int | None:
        """Channels ``C`` of ``x_t`` (``None`` when the config does not say)."""
        return config.get(self.channels_key)

    def token_dim(self, config: Mapping[str, Any]) -> int | None:
        """Width ``D`` of the conditioning tokens the network reads (``None`` when unknown)."""
        dim = config.get(self.token_key)
        return dim[0] if isinstance(dim, (list, tuple)) else dim

    # ----------------------------------------------------------------- calls
    def call(self, module: nn.Module, x: Tensor, timestep: Tensor, cb: ConditioningBatch, dtype: torch.dtype) -> Tensor:
        """The network's raw prediction ``(B, C, H, W)`` for ``x (B, C, H, W)`` at ``timestep`` (0-d or ``(B,)``)."""
        kwargs: dict[str, Any] = {}
        if not cb.unpadded:
            if not self.accepts("encoder_attention_mask"):
                raise TypeError(
                    f"{self.name}.forward has no encoder_attention_mask parameter, so it cannot take conditionings "
                    "of different lengths in one batch: call once per conditioning, use cfg_mode='separate' for "
                    "guidance, or give forward an encoder_attention_mask parameter"
                )
            kwargs["encoder_attention_mask"] = cb.mask
        if cb.added:
            if not self.accepts("added_cond_kwargs"):
                raise TypeError(
                    f"the conditioning carries added inputs {sorted(cb.added)} but {self.name}.forward has no "
                    "added_cond_kwargs parameter; use a conditioning built for this model"
                )
            kwargs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in cb.added.items()}
        if self.accepts("return_dict"):
            kwargs["return_dict"] = False
        return _first(module(x.to(dtype), timestep, cb.tokens.to(dtype), **kwargs))

    def set_timesteps(self, scheduler: Any, num_steps: int, shape: tuple[int, ...], device: torch.device) -> None:
        """Set ``scheduler``'s sampling timesteps as the family's pipeline does for latents of ``shape``."""
        scheduler.set_timesteps(num_steps, device=device)

    # ----------------------------------------------------------------- what a network call holds
    @staticmethod
    def network_input(args: tuple, kwargs: dict) -> Any:
        """The latents a network call received (U-Nets: ``sample``, often positional; transformers: ``hidden_states``)."""
        return args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))

    def image_hw(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        """The latent ``(H, W)`` of a network call (``None`` when its input is not image-shaped)."""
        x = self.network_input(args, kwargs)
        return tuple(x.shape[-2:]) if isinstance(x, Tensor) and x.dim() == 4 else None  # type: ignore[return-value]

    def token_layout(self, module: nn.Module, args: tuple, kwargs: dict) -> TokenLayout | None:
        """Image / text token counts of a call, for networks whose blocks carry both streams (else ``None``)."""
        return None

    def pipeline_branches(
        self, args: tuple, kwargs: dict, *, cfg: bool | None, call_in_step: int
    ) -> tuple[tuple[str, slice], ...]:
        """The CFG branches of one network call made by the family's *own pipeline* (nobody announced them).

        The classic pipelines stack ``cfg_order`` halves of one batch and feed both halves the *same* latents:
        a call is labelled as a CFG batch only when its input's halves are equal (verified), and a pipeline that
        says it runs CFG (``cfg``, its ``do_classifier_free_guidance``) but makes a call whose halves differ
        is refused rather than guessed at.

        Args:
            args, kwargs: the network call's arguments. cfg: the pipeline's own CFG flag, ``None`` if it has none.
            call_in_step: how many network calls the current denoising step made before this one.
        """
        x = self.network_input(args, kwargs)
        batch = int(x.shape[0])
        half = batch // 2
        if batch % 2 == 0 and cfg is not False and torch.equal(x[:half], x[half:]):
            return _batched(batch, self.cfg_order)
        if cfg:
            raise ValueError(
                f"the pipeline runs classifier-free guidance but its {self.name} call of batch {batch} does not "
                f"hold two equal halves of latents ({'/'.join(self.cfg_order)}); its branch layout is unknown: "
                "pass capture(..., cfg='batched' | 'separate') or drive the network through an interp.Denoiser"
            )
        return (("cond", slice(0, batch)),)


class _KeywordAdapter(Adapter):
    """Base of the transformer adapters: their ``forward`` takes ``hidden_states`` and keywords."""

    def signature(self, module: nn.Module) -> inspect.Signature:
        return inspect.signature(module.forward)

    @staticmethod
    def _batch_timestep(timestep: Tensor, batch: int) -> Tensor:
        # The pipelines pass one timestep per row (``t.expand(B)``): the same values, the same embedding.
        return (timestep[None] if timestep.dim() == 0 else timestep).expand(batch)

    def _refuse_padding(self, cb: ConditioningBatch) -> None:
        if not cb.unpadded:
            raise TypeError(
                f"{self.name} has no text attention mask, so it cannot take conditionings of different lengths in "
                "one batch (e.g. a phrase dropped beside the full prompt): call once per conditioning, or use "
                "cfg_mode='separate' for guidance"
            )

    @staticmethod
    def _learned_sigma(out: Tensor, channels: int) -> Tensor:
        # PixArt and DiT predict a variance in extra output channels; the pipelines sample with the first half.
        return out[:, :channels] if out.shape[1] == 2 * channels else out


class PixArtAdapter(_KeywordAdapter):
    """``PixArtTransformer2DModel``: T5 tokens with their attention mask, padded to the pipeline's length.

    The pipeline pads T5 embeddings to ``max_sequence_length`` and masks the padding; attention over masked keys
    is exactly zero, but the *length* changes rounding, so rows are zero-padded to ``pad_to`` tokens (masked)
    to reproduce the pipeline bit for bit. ``pad_to`` is set by the Denoiser (the pipeline's
    ``max_sequence_length``).
    """

    family = "pixart"
    token_key = "caption_channels"
    default_tokens = 120

    def __init__(self, module: nn.Module, *, pad_to: int | None = 120) -> None:
        super().__init__(module)
        self.pad_to = pad_to

    def call(self, module: nn.Module, x: Tensor, timestep: Tensor, cb: ConditioningBatch, dtype: torch.dtype) -> Tensor:
        tokens, mask = cb.tokens, cb.mask
        extra = (self.pad_to or 0) - tokens.shape[1]
        if extra > 0:
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], extra, tokens.shape[2])], 1)
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)
        out = module(
            x.to(dtype),
            encoder_hidden_states=tokens.to(dtype),
            encoder_attention_mask=mask,
            timestep=self._batch_timestep(timestep, x.shape[0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )
        return self._learned_sigma(_first(out), x.shape[1])


class DiTAdapter(_KeywordAdapter):
    """``DiTTransformer2DModel``: class-conditional; the class id rides in the conditioning's one token.

    A DiT conditioning (:func:`interp.models.class_conditioning`) holds one ``(1, 1)`` token whose value is the
    class id; the null condition is the pipeline's null class (1000). The DiT pipeline stacks CFG as
    ``[cond; uncond]``.
    """

    family = "dit"
    cfg_order = ("cond", "uncond")
    discrete_tokens = True
    default_tokens = 1

    def token_dim(self, config: Mapping[str, Any]) -> int | None:
        return 1

    def pipeline_branches(
        self, args: tuple, kwargs: dict, *, cfg: bool | None, call_in_step: int
    ) -> tuple[tuple[str, slice], ...]:
        """DiT's pipeline says which rows are unconditional in the call itself: the null class id (1000)."""
        labels = kwargs.get("class_labels")
        x = args[0] if args else kwargs.get("hidden_states")
        batch = int(x.shape[0])
        if labels is None:
            return (("cond", slice(0, batch)),)
        null = (labels.reshape(-1) == DIT_NULL_CLASS).tolist()
        n = sum(null)
        if n == 0:
            return (("cond", slice(0, batch)),)
        if n == batch:
            return (("uncond", slice(0, batch)),)
        if null != [False] * (batch - n) + [True] * n:
            raise ValueError(f"a DiT call mixes null-class rows {null} in an order that is not [cond; uncond]; "
                             "drive the network through an interp.Denoiser to label it")
        return (("cond", slice(0, batch - n)), ("uncond", slice(batch - n, batch)))

    def call(self, module: nn.Module, x: Tensor, timestep: Tensor, cb: ConditioningBatch, dtype: torch.dtype) -> Tensor:
        if cb.tokens.shape[1:] != (1, 1):
            raise ValueError(
                f"a DiT conditioning is one class-id token (1, 1) per row, got tokens {tuple(cb.tokens.shape[1:])}; "
                "build it with interp.models.class_conditioning(pipe, label)"
            )
        if cb.tokens.requires_grad:
            raise TypeError(DISCRETE_TOKENS)
        labels = cb.tokens[:, 0, 0].round().long()
        out = module(x.to(dtype), timestep=self._batch_timestep(timestep, x.shape[0]), class_labels=labels,
                     return_dict=False)
        return self._learned_sigma(_first(out), x.shape[1])


class SD3Adapter(_KeywordAdapter):
    """``SD3Transformer2DModel``: CLIP + T5 tokens (joint attention, no mask) and pooled projections."""

    family = "sd3"
    token_key = "joint_attention_dim"
    default_tokens = 77 + 256

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.patch_size = int(module.config["patch_size"])

    def set_timesteps(self, scheduler: Any, num_steps: int, shape: tuple[int, ...], device: torch.device) -> None:
        cfg = scheduler.config
        if not cfg.get("use_dynamic_shifting"):
            return super().set_timesteps(scheduler, num_steps, shape, device)
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        # StableDiffusion3Pipeline.__call__: a resolution-dependent shift μ from the number of image patches.
        tokens = (shape[-2] // self.patch_size) * (shape[-1] // self.patch_size)
        mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        scheduler.set_timesteps(num_steps, device=device, mu=mu)

    def token_layout(self, module: nn.Module, args: tuple, kwargs: dict) -> TokenLayout | None:
        hw, text = self.image_hw(module, args, kwargs), kwargs.get("encoder_hidden_states")
        if hw is None or not isinstance(text, Tensor):
            return None
        p = self.patch_size
        return TokenLayout(image=(hw[0] // p) * (hw[1] // p), text=int(text.shape[1]), joint_order=("image", "text"))

    def call(self, module: nn.Module, x: Tensor, timestep: Tensor, cb: ConditioningBatch, dtype: torch.dtype) -> Tensor:
        self._refuse_padding(cb)
        out = module(
            hidden_states=x.to(dtype),
            timestep=self._batch_timestep(timestep, x.shape[0]),
            encoder_hidden_states=cb.tokens.to(dtype),
            pooled_projections=cb.added["pooled_projections"].to(dtype),
            return_dict=False,
        )
        return _first(out)


class FluxAdapter(_KeywordAdapter):
    """``FluxTransformer2DModel``: 2×2 latent patches packed into tokens, position ids, timestep / 1000.

    ``x_t`` stays image-shaped ``(B, C, H, W)`` everywhere in the toolkit; the adapter packs it the way
    ``FluxPipeline._pack_latents`` does, and unpacks the prediction. Guidance-distilled checkpoints
    (``guidance_embeds``) take ``added["guidance"]`` per row.
    """

    family = "flux"
    token_key = "joint_attention_dim"
    default_tokens = 512

    def in_channels(self, config: Mapping[str, Any]) -> int | None:
        c = config.get("in_channels")
        return None if c is None else c // 4  # packed tokens hold 2×2 patches

    def image_hw(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        # Packed tokens carry their patch row and column in img_ids (N, 3): (0, row, col); 2×2 latents per patch.
        ids = kwargs.get("img_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] == 0:
            return None
        return 2 * (int(ids[:, 1].max()) + 1), 2 * (int(ids[:, 2].max()) + 1)

    def token_layout(self, module: nn.Module, args: tuple, kwargs: dict) -> TokenLayout | None:
        ids, text = kwargs.get("img_ids"), kwargs.get("encoder_hidden_states")
        if not isinstance(ids, Tensor) or not isinstance(text, Tensor):
            return None
        return TokenLayout(image=int(ids.shape[0]), text=int(text.shape[1]), joint_order=("text", "image"))

    def pipeline_branches(
        self, args: tuple, kwargs: dict, *, cfg: bool | None, call_in_step: int
    ) -> tuple[tuple[str, slice], ...]:
        """FluxPipeline never batches CFG: with true CFG it calls the prompt, then the negative prompt, per step."""
        x = kwargs.get("hidden_states", args[0] if args else None)
        return (("cond" if call_in_step == 0 else "uncond", slice(0, int(x.shape[0]))),)

    def call(self, module: nn.Module, x: Tensor, timestep: Tensor, cb: ConditioningBatch, dtype: torch.dtype) -> Tensor:
        from diffusers import FluxPipeline

        self._refuse_padding(cb)
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"Flux packs 2×2 latent patches: x_t height and width must be even, got {H}×{W}")
        packed = FluxPipeline._pack_latents(x.to(dtype), B, C, H, W)
        img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, dtype)
        txt_ids = torch.zeros(cb.tokens.shape[1], 3, device=x.device, dtype=dtype)
        t = self._batch_timestep(timestep, B).to(dtype)
        guidance = cb.added.get("guidance")
        out = _first(module(
            hidden_states=packed,
            timestep=t / 1000,
            guidance=None if guidance is None else guidance.to(dtype),
            pooled_projections=cb.added["pooled_projections"].to(dtype),
            encoder_hidden_states=cb.tokens.to(dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        ))
        # _unpack_latents works in pixel units (it divides by the VAE factor 8 and doubles): undo that here.
        return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)

    def set_timesteps(self, scheduler: Any, num_steps: int, shape: tuple[int, ...], device: torch.device) -> None:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        # FluxPipeline.__call__: σ from 1 to 1/n, and a shift μ from the number of image tokens.
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        cfg = scheduler.config
        mu = calculate_shift((shape[-2] // 2) * (shape[-1] // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)


#: Adapters by the network's class name (diffusers' own classes; a subclass is matched through its MRO).
ADAPTERS: dict[str, type[Adapter]] = {
    "PixArtTransformer2DModel": PixArtAdapter,
    "DiTTransformer2DModel": DiTAdapter,
    "SD3Transformer2DModel": SD3Adapter,
    "FluxTransformer2DModel": FluxAdapter,
}


def adapter_for(module: nn.Module, **kwargs: Any) -> Adapter:
    """The adapter of ``module``'s family (by class, through its MRO); U-Net-style networks get :class:`Adapter`."""
    for cls in type(module).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](module, **kwargs)
    return Adapter(module)
