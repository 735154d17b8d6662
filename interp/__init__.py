"""scorescope's substrate: the three nouns (Denoiser, Conditioning, Site), capture, and what every verb shares.

``probes`` and ``interventions`` are built on this package; it imports neither (``tests/test_layers.py``).
Shared by both verbs: noisy inputs and noise levels (:mod:`interp.inputs`), the measured function
(:mod:`interp.evaluate`), results and tidy frames (:mod:`interp.results`), composition masks
(:mod:`interp.masks`), restorable model edits (:mod:`interp.hooks`, :mod:`interp.forward_mode`), atomic
files (:mod:`interp.io`), and the model zoo with analytic test models (:mod:`interp.models`).
"""

from interp.capture import (
    CaptureBudgetError,
    CaptureConflictError,
    SiteSelectionError,
    capture,
    read_activation,
    read_activations,
)
from interp.conditioning import Conditioning, ConditioningBatch
from interp.context import UNetCall, current_call, denoising_step, unet_call
from interp.denoiser import Denoiser
from interp.hooks import HookSet, count_hooks
from interp.sampling import sample
from interp.site import Site, SiteError, module_paths, resolve_paths
from interp.store import DamagedStoreError, IncompleteStoreWarning, open_store

__version__ = "0.2.0"

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
    "CaptureBudgetError",
    "CaptureConflictError",
    "ClevrPipeline",
    "Conditioning",
    "ConditioningBatch",
    "DamagedStoreError",
    "Denoiser",
    "HookSet",
    "IncompleteStoreWarning",
    "LocationEncoder",
    "Site",
    "SiteError",
    "SiteSelectionError",
    "UNetCall",
    "capture",
    "count_hooks",
    "current_call",
    "denoising_step",
    "module_paths",
    "open_store",
    "read_activation",
    "read_activations",
    "resolve_paths",
    "sample",
    "unet_call",
]
