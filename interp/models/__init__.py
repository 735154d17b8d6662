"""The model zoo: SDXL (real loader, tiny random pipeline, full config) and the CLEVR models."""

from interp.models.clevr import (
    ClevrPipeline,
    LocationEncoder,
    clevr_pipeline,
    clevr_unet,
    clevr_unet_config,
    validate_locations,
)
from interp.models.sdxl import (
    load_sdxl,
    prompt_conditioning,
    sdxl_denoiser,
    sdxl_unet_config,
    sdxl_unet_meta,
    tiny_sdxl,
)

__all__ = [
    "ClevrPipeline",
    "LocationEncoder",
    "clevr_pipeline",
    "clevr_unet",
    "clevr_unet_config",
    "load_sdxl",
    "prompt_conditioning",
    "sdxl_denoiser",
    "sdxl_unet_config",
    "sdxl_unet_meta",
    "tiny_sdxl",
    "validate_locations",
]
