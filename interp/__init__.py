"""scorescope's substrate: the three nouns (Denoiser, Conditioning, Site) and the capture verb.

``probes`` and ``interventions`` are built on these; this package imports neither.
"""

from interp.conditioning import Conditioning, ConditioningBatch
from interp.context import UNetCall, current_call, denoising_step, unet_call
from interp.denoiser import Denoiser
from interp.hooks import HookSet, count_hooks
from interp.sampling import sample
from interp.site import Site, SiteError, module_paths, resolve_paths

__version__ = "0.1.0"

# Imported on first use, so that ``import interp`` does not load diffusers (seconds). The model classes are
# also what diffusers finds as ``getattr(interp, name)`` when ``ClevrPipeline.from_pretrained`` loads a
# pipeline saved with them.
_LAZY = {
    "ClevrPipeline": "interp.models.clevr",
    "LocationEncoder": "interp.models.clevr",
    "ClevrLocalUNet": "interp.models.clevr_local",
    "LocatedLocationEncoder": "interp.models.clevr_local",
    "ColourLocationEncoder": "interp.models.clevr_colour",
    "CoordUNet2DConditionModel": "interp.models.coord_unet",
    "load_clevr": "interp.models.shipped",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'interp' has no attribute {name!r}")


__all__ = [
    "ClevrPipeline",
    "Conditioning",
    "ConditioningBatch",
    "Denoiser",
    "HookSet",
    "LocationEncoder",
    "Site",
    "SiteError",
    "UNetCall",
    "count_hooks",
    "current_call",
    "denoising_step",
    "module_paths",
    "resolve_paths",
    "sample",
    "unet_call",
]
