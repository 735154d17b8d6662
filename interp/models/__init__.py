"""The model zoo: SDXL (real loader, full config), tiny random pipelines of every family, the CLEVR models."""

from interp.models.clevr import (
    ClevrPipeline,
    LocationEncoder,
    clevr_pipeline,
    clevr_unet,
    clevr_unet_config,
    validate_locations,
)
from interp.models.prompts import class_conditioning, pipeline_family, prompt_conditioning
from interp.models.sdxl import (
    load_sdxl,
    sdxl_denoiser,
    sdxl_unet_config,
    sdxl_unet_meta,
    tiny_sdxl,
)
from interp.models.tiny import tiny

__all__ = [
    "ClevrPipeline",
    "LocationEncoder",
    "clevr_pipeline",
    "clevr_unet",
    "clevr_unet_config",
    "class_conditioning",
    "load_sdxl",
    "pipeline_family",
    "prompt_conditioning",
    "sdxl_denoiser",
    "sdxl_unet_config",
    "sdxl_unet_meta",
    "tiny",
    "tiny_sdxl",
    "validate_locations",
]
