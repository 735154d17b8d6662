"""Shared test setup: offline, deterministic, caches inside a temp dir, small thread count."""

from __future__ import annotations

import os
import tempfile

# Must happen before diffusers / transformers / matplotlib are imported anywhere.
_CACHE = tempfile.mkdtemp(prefix="scorescope-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(_CACHE, "hf"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_CACHE, "mpl"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: on a 2-core machine that is doing anything else, two OpenMP threads oversubscribe and a
# tiny forward went from 40 ms to 4 s (measured here); one thread costs at most ~1.7x on an idle machine.
torch.set_num_threads(int(os.environ.get("SCORESCOPE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_sdxl_pipe():
    """The tiny random SDXL pipeline (session-scoped: treat as read-only)."""
    from interp.models import tiny_sdxl

    return tiny_sdxl(0)


@pytest.fixture(scope="session")
def tiny_clevr_pipe():
    """The tiny random CLEVR pipeline (session-scoped: treat as read-only)."""
    from interp.models import clevr_pipeline

    return clevr_pipeline("tiny", seed=0)


@pytest.fixture()
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    """Each test starts in grad mode, and whatever mode it leaves is undone.

    A test that abandons generators out of order (``tests/test_capture.py``'s interleaved-capture test suspends a
    generator inside ``torch.no_grad()``) would otherwise leave gradients off for every later test on this thread.
    """
    torch.set_grad_enabled(True)
    yield
    torch.set_grad_enabled(True)
