"""``patching_sweep``: activation patching over (site, step), TransformerLens ``patching.py`` style.

One clean sampling run is recorded at the sites; one corrupted run gives the baseline; then for each
(site, step) the clean activation is patched into the corrupted run at that step alone and the final
sample compared. Cost: ``2 + len(sites) · len(steps)`` sampling runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from interp.denoiser import CondLike, Denoiser
from interp.sampling import sample
from interp.site import Site
from interp.validation import check_int

from interventions.applied import apply
from interventions.edits import Patch
from interventions.record import record
from interventions.sources import FromStore

Metric = Callable[[Tensor, Tensor, Tensor], float]


def restored_fraction(patched: Tensor, clean: Tensor, corrupt: Tensor) -> float:
    """The fraction of the clean − corrupt difference the patch restores (projection over the whole sample).

    ``⟨patched − corrupt, clean − corrupt⟩ / ‖clean − corrupt‖²``: 1 when the patch gives the clean sample,
    0 when it changes nothing (NaN if clean and corrupt samples are identical).
    """
    d = (clean - corrupt).double().flatten()
    n = float(d @ d)
    return float((patched - corrupt).double().flatten() @ d) / n if n > 0 else float("nan")


def patching_sweep(
    den: Denoiser,
    clean_cond: CondLike,
    corrupt_cond: CondLike,
    sites: Sequence[str] | str,
    steps: Sequence[int] | range | int,
    *,
    shape: Sequence[int],
    num_steps: int,
    seed: int = 0,
    metric: Metric | None = None,
    **sample_kwargs: Any,
):
    """Patch each site's clean activation into the corrupted run, one (site, step) at a time.

    Args:
        den: the denoiser.
        clean_cond, corrupt_cond: conditionings of the clean and corrupted runs (same shapes at every site).
        sites: module paths/globs, or ``"output"``; a glob is patched as a whole (every module it matches).
        steps: denoising steps to patch (each alone), ``0 … num_steps − 1``.
        shape: ``(B, C, H, W)`` of the samples.
        num_steps: denoising steps of every run.
        seed: the initial noise of both runs.
        metric: ``metric(patched, clean, corrupt) -> float`` on the final samples; default
            :func:`restored_fraction`.
        sample_kwargs: passed to :func:`interp.sample` (``scheduler=``, ``guidance_scale=``).

    Returns:
        ``pandas.DataFrame`` with columns ``site, step, metric, value, seed``.
    """
    import pandas as pd

    site_list = [sites] if isinstance(sites, str) else list(sites)
    if not site_list:
        raise ValueError("patching_sweep needs at least one site")
    step_list = [steps] if isinstance(steps, int) else list(steps)
    num_steps = check_int("num_steps", num_steps, minimum=1)
    bad = [s for s in step_list if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < num_steps]
    if not step_list or bad:
        raise ValueError(f"steps must be a non-empty list of ints in [0, {num_steps - 1}], got {bad or step_list}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be a callable metric(patched, clean, corrupt) -> float, got {type(metric).__name__}")
    fn = metric or restored_fraction
    name = getattr(fn, "__name__", type(fn).__name__)
    run = dict(shape=shape, num_steps=num_steps, seed=seed, **sample_kwargs)
    with torch.no_grad():
        with record(den, [Site(s, steps=step_list) for s in site_list]) as rec:
            clean = sample(den, clean_cond, **run)
        corrupt = sample(den, corrupt_cond, **run)
        source = FromStore(rec.store)
        rows = []
        for site in site_list:
            for step in step_list:
                with apply(den, Patch(site, source, steps=[step])):
                    patched = sample(den, corrupt_cond, **run)
                rows.append({"site": site, "step": step, "metric": name, "value": float(fn(patched, clean, corrupt)),
                             "seed": seed})
    return pd.DataFrame(rows, columns=["site", "step", "metric", "value", "seed"])


__all__ = ["patching_sweep", "restored_fraction"]
