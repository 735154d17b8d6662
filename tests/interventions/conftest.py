"""Fixtures for the intervention tests: the tiny CLEVR model and the exactly local analytic model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# pytest puts tests/ on sys.path (rootdir conftest, no __init__.py), where tests/interventions would shadow the
# real `interventions` package as a namespace package. Put the repository root first and drop a shadow import.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
if getattr(sys.modules.get("interventions"), "__file__", "") is None:
    for _name in [n for n in sys.modules if n == "interventions" or n.startswith("interventions.")]:
        del sys.modules[_name]

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def clevr(tiny_clevr_pipe):
    """(pipeline, denoiser, two-object conditioning) of the tiny random CLEVR model (session-built, read-only)."""
    pipe = tiny_clevr_pipe
    return pipe, pipe.denoiser(), pipe.conditioning([[0.2, 0.3], [0.7, 0.8]])


@pytest.fixture(scope="module")
def local_den():
    """Exactly local analytic model (additive over conditioners, bumps of radius 0.2), float64."""
    from interp.models.analytic import toy_denoiser

    return toy_denoiser("local", size=12, dtype=torch.float64)


@pytest.fixture(scope="module")
def toy_cond():
    from interp.models.analytic import toy_conditioning

    return toy_conditioning([[0.25, 0.25], [0.75, 0.7]], dtype=torch.float64)


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """One intra-op thread (a shared 2-core machine: two OpenMP threads made tiny forwards ~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
