"""Fixtures for the probe tests: analytic toy denoisers with known locality, and the tiny CLEVR model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# pytest puts tests/ on sys.path (rootdir conftest, no __init__.py), where tests/probes would shadow the
# real `probes` package as a namespace package. Put the repository root first and drop a shadow import.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
if getattr(sys.modules.get("probes"), "__file__", "") is None:
    for _name in [n for n in sys.modules if n == "probes" or n.startswith("probes.")]:
        del sys.modules[_name]

import pytest  # noqa: E402
import torch  # noqa: E402

from interp.models.analytic import toy_conditioning, toy_denoiser  # noqa: E402

LOCS = [[0.25, 0.25], [0.75, 0.7]]  # far apart: bumps of radius 0.2 do not overlap


@pytest.fixture(scope="module")
def local_den():
    """Exactly local toy model (receptive-field radius 2, conditioner bumps of radius 0.2), float64."""
    return toy_denoiser("local", size=12, dtype=torch.float64)


@pytest.fixture(scope="module")
def global_den():
    """Global toy model (GroupNorm + global mixing + conditioners everywhere), float64."""
    return toy_denoiser("global", size=12, dtype=torch.float64)


@pytest.fixture(scope="module")
def linear_den():
    """Toy model linear in x and in the conditioner features, float64."""
    return toy_denoiser("linear", size=8, dtype=torch.float64)


@pytest.fixture(scope="module")
def toy_cond():
    return toy_conditioning(LOCS, dtype=torch.float64)


@pytest.fixture(scope="module")
def clevr():
    """(pipeline, denoiser, conditioning) of the tiny random CLEVR model (global: attention + GroupNorm)."""
    from interp.models import clevr_pipeline

    pipe = clevr_pipeline("tiny", seed=0)
    return pipe, pipe.denoiser(), pipe.conditioning([[0.2, 0.3], [0.7, 0.8]])


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Probe tests run single-threaded: on a shared 2-core machine, 2 intra-op threads competing with other
    processes made a tiny-U-Net forward ~100x slower (OpenMP barriers), 1 thread does not. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
