"""The CLEVR models: a 32×32 ``UNet2DConditionModel`` that cross-attends to one token per object location.

Conditioners are object locations ``(x, y) ∈ [0, 1]²``. The :class:`LocationEncoder` turns each location
into one token (Fourier features → MLP) and always prepends a learned **null token**, so that the
null condition (no objects requested) is a real, trained input and every cross-attention row has at
least one key to attend to. A :class:`ClevrPipeline` bundles U-Net, encoder and scheduler and is saved
and loaded with diffusers' ``save_pretrained`` / ``from_pretrained`` (safetensors).

The standard U-Net here is deliberately *global* (self-attention, cross-attention to every token,
GroupNorm): it is the model whose locality the probes measure, not one that is local by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import ConfigMixin, DDPMScheduler, DiffusionPipeline, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from interp.conditioning import Conditioning
from interp.validation import check_locations

CLEVR_PRESETS: dict[str, dict[str, Any]] = {
    # 1.7M parameters: the CPU preset.
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=64),
    # 10.1M parameters: the GPU preset.
    "base": dict(block_out_channels=(64, 128, 128), layers_per_block=2, attention_head_dim=8, cross_attention_dim=128),
    # 0.43M parameters: for tests.
    "tiny": dict(block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=8, cross_attention_dim=32),
}


def clevr_unet_config(preset: str = "small", sample_size: int = 32, **overrides: Any) -> dict[str, Any]:
    """Config of the standard (global) CLEVR U-Net.

    Layout: a plain ResNet level at full resolution, cross-attention (with self-attention) at the two
    lower resolutions and in the mid block — SDXL's layout at CLEVR scale.
    """
    if preset not in CLEVR_PRESETS:
        raise ValueError(f"unknown CLEVR U-Net preset {preset!r}; choose one of {sorted(CLEVR_PRESETS)}")
    p = CLEVR_PRESETS[preset]
    norm_groups = min(16, p["block_out_channels"][0])
    cfg = dict(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=p["block_out_channels"],
        layers_per_block=p["layers_per_block"],
        attention_head_dim=p["attention_head_dim"],
        cross_attention_dim=p["cross_attention_dim"],
        norm_num_groups=norm_groups,
    )
    cfg.update(overrides)
    return cfg


def clevr_unet(preset: str = "small", seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    """A freshly initialised standard CLEVR U-Net (deterministic by ``seed``)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**clevr_unet_config(preset, **overrides))


class LocationEncoder(ModelMixin, ConfigMixin):
    """Object locations → cross-attention tokens, with a learned null token always present.

    Args:
        dim: token width (the U-Net's ``cross_attention_dim``).
        n_frequencies: Fourier octaves per coordinate (features ``sin/cos(2^k π x)``).
        hidden: MLP width.
    """

    @register_to_config
    def __init__(self, dim: int = 64, n_frequencies: int = 6, hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer(
            "frequencies", (2.0 ** torch.arange(n_frequencies)) * math.pi, persistent=False
        )
        in_features = 2 + 4 * n_frequencies
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.null_token = nn.Parameter(torch.randn(1, dim) * 0.02)

    def features(self, locations: Tensor) -> Tensor:
        """``(..., 2)`` locations → ``(..., 2 + 4F)`` Fourier features."""
        ang = locations.unsqueeze(-1) * self.frequencies  # (..., 2, F)
        return torch.cat([locations, ang.sin().flatten(-2), ang.cos().flatten(-2)], dim=-1)

    def forward(self, locations: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode a padded batch.

        Args:
            locations: ``(B, K, 2)`` normalised ``(x, y)``.
            mask: ``(B, K)`` bool, True for real objects (default: all real).

        Returns:
            ``tokens (B, 1 + K, D)`` with the null token first, and ``mask (B, 1 + K)``.
        """
        mask = check_batch_locations(locations, mask)
        B, K, _ = locations.shape
        tokens = self.mlp(self.features(locations))
        null = self.null_token.expand(B, 1, -1)
        full_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        return torch.cat([null, tokens], dim=1), full_mask

    def conditioning(self, locations: Tensor | Sequence[Sequence[float]], *, labels: Sequence[str] | None = None) -> Conditioning:
        """A :class:`Conditioning` with one conditioner per location ``(k, 2)`` (and the null token as context).

        The tokens follow the encoder's dtype; ``Conditioning.locations`` keeps the caller's precision
        (a float64 tensor stays float64, see :func:`validate_locations`), on CPU.
        """
        loc = validate_locations(locations)
        p = self.null_token
        tokens = self.mlp(self.features(loc.to(device=p.device, dtype=p.dtype))) if loc.shape[0] else p.new_zeros((0, p.shape[1]))
        return Conditioning.from_tokens(
            self.null_token,
            list(tokens.unbind(0)),
            labels=labels if labels is not None else [f"obj{j}" for j in range(loc.shape[0])],
            locations=loc.detach().cpu(),
        )


def validate_locations(locations: Tensor | Sequence[Sequence[float]], max_objects: int | None = None) -> Tensor:
    """Check a ``(k, 2)`` array of normalised ``(x, y)`` locations in ``[0, 1]`` and return it as a tensor.

    A floating tensor keeps its dtype (float64 locations stay float64: probes compute distances from them);
    sequences, numpy arrays of integers and integer tensors become float32. ``[]`` gives ``(0, 2)``.
    """
    if isinstance(locations, Tensor):
        loc = locations
    else:
        try:
            loc = torch.as_tensor(locations)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"locations must be a (k, 2) array of (x, y) numbers, got {type(locations).__name__}: {err}") from None
    if loc.dtype == torch.bool or loc.is_complex():
        raise TypeError(f"locations must be real (x, y) numbers, got {loc.dtype}")
    if not loc.is_floating_point():
        loc = loc.to(torch.float32)
    if loc.numel() == 0 and (loc.dim() == 1 or tuple(loc.shape) == (0, 2)):
        return loc.reshape(0, 2)
    if loc.dim() != 2 or loc.shape[1] != 2:
        raise ValueError(f"locations must be (k, 2) normalised (x, y) pairs, got shape {tuple(loc.shape)}")
    check_locations("locations", loc)
    if max_objects is not None and loc.shape[0] > max_objects:
        raise ValueError(f"{loc.shape[0]} locations requested, more than the maximum of {max_objects} (max_objects)")
    return loc


def check_batch_locations(locations: Tensor, mask: Tensor | None) -> Tensor:
    """Check an encoder's padded batch: ``locations (B, K, 2)`` in ``[0, 1]`` where ``mask (B, K)`` is True.

    Returns the mask (all True when ``mask`` is None). Padded slots (mask False) may hold any value.
    Value checks are skipped inside ``torch.func`` transforms.
    """
    if not isinstance(locations, Tensor) or locations.dim() != 3 or locations.shape[-1] != 2:
        shape = tuple(locations.shape) if isinstance(locations, Tensor) else type(locations).__name__
        raise ValueError(f"locations must be a padded batch (B, K, 2) of normalised (x, y), got {shape}")
    if mask is None:
        mask = torch.ones(locations.shape[:2], dtype=torch.bool, device=locations.device)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = real object), got {kind}; use mask.bool()")
    if mask.shape != locations.shape[:2]:
        raise ValueError(f"mask must be (B, K) = {tuple(locations.shape[:2])}, got {tuple(mask.shape)}")
    check_locations("locations", locations, mask)
    return mask


class ClevrPipeline(DiffusionPipeline):
    """U-Net + location encoder + scheduler, saved and loaded as one diffusers pipeline folder."""

    model_cpu_offload_seq = "location_encoder->unet"

    def __init__(self, unet: nn.Module, location_encoder: LocationEncoder, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, location_encoder=location_encoder, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> ClevrPipeline:
        """diffusers' loader, plus aligned weight storage so a reload computes bit-identically."""
        # diffusers resolves custom component classes only from modules already imported: import ours
        import interp.models.clevr_colour  # noqa: F401
        import interp.models.coord_unet  # noqa: F401
        import interp.models.clevr_local  # noqa: F401
        from interp.models.alignment import realign_pipeline_

        return realign_pipeline_(super().from_pretrained(*args, **kwargs))

    def conditioning(self, locations: Tensor | Sequence[Sequence[float]], **attributes: Any) -> Conditioning:
        """Conditioning for one scene's requested object locations ``(k, 2)``.

        ``attributes`` go to the encoder (e.g. ``colours=[...]`` for the colour-conditioned encoder).
        """
        with torch.no_grad():
            return self.location_encoder.conditioning(locations, **attributes)

    def denoiser(self, **kwargs: Any):
        """A :class:`~interp.Denoiser` over this pipeline's U-Net and noise schedule."""
        from interp.denoiser import Denoiser

        kwargs.setdefault("name", getattr(self, "_scorescope_name", None) or "clevr")
        return Denoiser(self.unet, self.scheduler, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        locations: Sequence[Tensor | Sequence[Sequence[float]]],
        *,
        num_inference_steps: int = 50,
        seed: int = 0,
        guidance_scale: float | None = None,
        scheduler: str = "ddim",
    ) -> Tensor:
        """Sample one image per scene (a list of ``(k_b, 2)`` location arrays); returns ``(B, 3, H, W)`` in [-1, 1]."""
        from interp.sampling import sample

        conds = [self.conditioning(loc) for loc in locations]
        size = self.unet.config.sample_size
        return sample(
            self.denoiser(guidance_scale=guidance_scale),
            conds,
            shape=(len(conds), self.unet.config.in_channels, size, size),
            num_steps=num_inference_steps,
            seed=seed,
            scheduler=scheduler,
        ).clamp(-1, 1)


def clevr_pipeline(preset: str = "small", seed: int = 0, **unet_overrides: Any) -> ClevrPipeline:
    """A randomly initialised standard CLEVR pipeline (DDPM schedule, ε-prediction)."""
    unet = clevr_unet(preset, seed=seed, **unet_overrides)
    torch.manual_seed(seed + 1)
    encoder = LocationEncoder(dim=unet.config.cross_attention_dim)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    return ClevrPipeline(unet=unet, location_encoder=encoder, scheduler=scheduler)
