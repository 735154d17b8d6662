"""Conditional locality: which output pixels does conditioner c_j move?

Two maps per conditioner ``j`` (SCIENCE.md §3.2), each averaged over forward-process samples ``x_t``:

* **JVP map** ``G_c(i, j) = E[‖∂D_i/∂c_j‖_F]``. One forward-mode pass (``torch.func.jvp``) along a
  direction ``v`` in ``c_j``'s token space gives ``(∂D/∂c_j)·v`` at *every* pixel at once, so the exact
  Frobenius norm costs one pass per coordinate of ``c_j`` (``directions="all"``) — or, *(ours)*, an
  unbiased estimate of its square from ``n`` Gaussian directions (``E_v |Jv|² = ‖J‖²_F``). Directions are
  batched along the model's batch axis (``n`` copies of ``x_t``, one tangent each), which is how a GPU
  runs them together. Forward mode through diffusers needs :func:`interp.forward_mode.forward_mode_ready`.
* **Ablation map** ``Δ_j(i) = ‖D_i(x|c) − D_i(x|c∖j)‖`` over channels — the discrete counterpart for
  conditioners that are not small perturbations (text phrases, colours).
* **Signed attribution** ``(∂D/∂c_j)·(c_j − b_j)`` per channel: the first-order effect of moving ``c_j``
  from a baseline ``b`` (zeros by default) — what integrated gradients computes exactly for a model linear
  in ``c`` (:mod:`probes.baselines` uses the same output format).

Summaries (*ours*, :mod:`probes.summaries`): in-region fraction within radius ``r`` of ``c_j``'s location,
leakage to pixels nearer another conditioner or to background, and the effective number of conditioners
per pixel.

Branches: ``"cond"`` differentiates the conditional prediction; ``"guided"`` is ``s ×`` that, since the
null condition holds no conditioner tokens (``Conditioning.null()``); ``"uncond"`` does not depend on c_j.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from interp import Conditioning, ConditioningBatch, Denoiser
from interp.forward_mode import forward_mode_ready
from interp.inputs import as_seeds, check_conditioning, check_locations, noisy_inputs, resolve_timestep
from interp.validation import check_finite
from interp.compat import renamed_kwargs
from interp.evaluate import Quantity, accumulation_dtype, evaluate
from interp.results import ProbeResult
from probes.summaries import effective_conditioners, region_fractions

Maps = Sequence[Literal["jvp", "ablation", "attribution"]]


def _batched(cond: Conditioning, n: int) -> ConditioningBatch:
    return ConditioningBatch.stack([cond]).repeat(n)


def token_function(den: Denoiser, x: Tensor, timestep: Tensor, cond: Conditioning, n: int, *, quantity: Quantity = "prediction"):
    """``f(tokens (n, L, D)) -> (n, C, H, W)``: the conditional branch at one input ``x (1, C, H, W)``."""
    base = _batched(cond, n)
    xs = x.expand(n, *x.shape[1:]).contiguous()

    def f(tokens: Tensor) -> Tensor:
        cb = base.with_tokens(tokens)  # keeps each row's Conditioning (owners, locations) for edits inside the net
        return evaluate(den, xs, timestep, cb, branch="cond", quantity=quantity)

    return f


def direction_set(cond: Conditioning, j: int, directions: int | str, *, seed: int = 0) -> tuple[Tensor, float]:
    """Tangents ``(N, L, D)`` spanning conditioner ``j``'s tokens, and the factor turning Σ|Jv|² into ‖J‖²_F.

    ``"all"``: the ``n_j·D`` coordinate directions (exact, factor 1). ``int n``: ``n`` standard Gaussian
    directions (unbiased, factor ``1/n``).
    """
    idx = cond.token_indices(j)
    L, D = cond.tokens.shape
    if directions == "all":
        n = idx.numel() * D
        v = torch.zeros(n, L, D, dtype=cond.tokens.dtype, device=cond.tokens.device)
        eye = torch.eye(n, dtype=v.dtype, device=v.device).reshape(n, idx.numel(), D)
        v[:, idx] = eye
        return v, 1.0
    if isinstance(directions, int) and directions > 0:
        g = torch.Generator().manual_seed(seed)
        v = torch.zeros(directions, L, D, dtype=cond.tokens.dtype)
        v[:, idx] = torch.randn(directions, idx.numel(), D, generator=g, dtype=torch.float64).to(v.dtype)
        return v.to(cond.tokens.device), 1.0 / directions
    raise ValueError(f"directions must be 'all' or a positive int, got {directions!r}")


@renamed_kwargs(output="quantity")
def conditioner_jvp(
    den: Denoiser,
    cond: Conditioning,
    tangents: Tensor,
    *legacy: Tensor,
    x_t: Tensor | None = None,
    t: float | None = None,
    timestep: Tensor | float | int | None = None,
    quantity: Quantity = "prediction",
    chunk_size: int = 8,
) -> Tensor:
    """``(∂D/∂tokens)·v`` for each tangent ``v`` in ``tangents (N, L, D)`` at one input ``x_t (1, C, H, W)``.

    ``t`` (noise fraction) or ``timestep`` (raw) gives ``x_t``'s noise level. Returns ``(N, C, H, W)``
    (float32, float64 for float64 ``x_t``). Call inside :func:`interp.forward_mode.forward_mode_ready` for
    diffusers models. The pre-0.2 call ``conditioner_jvp(den, x, timestep, cond, tangents)`` still works for
    one release, with a ``DeprecationWarning``.
    """
    if isinstance(cond, Tensor):  # the old positional order (den, x, timestep, cond, tangents)
        import warnings

        if len(legacy) != 2 or x_t is not None or t is not None or timestep is not None:
            raise TypeError("conditioner_jvp takes (den, cond, tangents, *, x_t=, t= | timestep=)")
        warnings.warn("conditioner_jvp(den, x, timestep, cond, tangents) is deprecated: call "
                      "conditioner_jvp(den, cond, tangents, x_t=x, timestep=timestep)", DeprecationWarning, stacklevel=2)
        x_t, timestep, cond, tangents = cond, tangents, legacy[0], legacy[1]
    elif legacy:
        raise TypeError("conditioner_jvp takes (den, cond, tangents) positionally; pass x_t=, t= / timestep= by keyword")
    if not isinstance(x_t, Tensor) or x_t.dim() != 4 or x_t.shape[0] != 1:
        raise ValueError(f"x_t must be one input (1, C, H, W), got {getattr(x_t, 'shape', type(x_t).__name__)}")
    check_finite("x_t", x_t)  # before torch.func hides NaNs from the Denoiser's checks
    ts = resolve_timestep(den, t=t, timestep=timestep)
    x = x_t
    outs = []
    acc = accumulation_dtype(x)
    for start in range(0, tangents.shape[0], chunk_size):
        v = tangents[start : start + chunk_size]
        f = token_function(den, x, ts, cond, v.shape[0], quantity=quantity)
        primal = cond.tokens.unsqueeze(0).expand(v.shape[0], -1, -1).clone()
        _, tan = torch.func.jvp(f, (primal,), (v.to(primal.dtype),))
        outs.append(tan.detach().to(acc))
    return torch.cat(outs)


@renamed_kwargs(output="quantity")
def conditional_locality(
    den: Denoiser,
    cond: Conditioning,
    t: float | Sequence[float] | None = None,
    seeds: int | Sequence[int] = 4,
    *,
    x_t: Tensor | None = None,
    timestep: Tensor | float | int | None = None,
    maps: Maps = ("jvp", "ablation"),
    directions: int | str = "all",
    radius: float | None = 0.2,
    baseline: Tensor | None = None,
    x0: Tensor | None = None,
    shape: Sequence[int] | None = None,
    branch: Literal["cond", "guided"] = "cond",
    quantity: Quantity = "prediction",
    chunk_size: int = 8,
    max_conditioners: int = 64,
    dtype: torch.dtype = torch.float32,
) -> ProbeResult:
    """Conditional-locality maps of every conditioner, per noise level, and their summaries.

    Args:
        den: the denoiser. cond: conditioning with ``k >= 1`` conditioners.
        t: noise fraction(s) in ``[0, 1]``. seeds: forward-process samples.
        x_t / timestep: explicit inputs ``(S, C, H, W)`` and their noise level (``t`` one fraction, or
            ``timestep``) instead of forward-process samples (:func:`interp.inputs.noisy_inputs`).
        maps: which maps to compute: ``"jvp"`` (‖∂D_i/∂c_j‖), ``"ablation"`` (‖D(c) − D(c∖j)‖),
            ``"attribution"`` (signed ``(∂D/∂c_j)·(c_j − b_j)``).
        directions: ``"all"`` coordinate directions (exact) or a number of random directions.
        radius: region radius in normalised Euclidean units (a fraction of the image side) for the location
            summaries; ``None`` skips them.
        baseline: ``(L, D)`` baseline tokens for ``"attribution"`` (default zeros).
        x0, shape, dtype: forward-process inputs (see :func:`interp.inputs.forward_samples`).
        branch: ``"cond"`` or ``"guided"`` (``s ×`` the conditional derivative; ablation uses the real CFG output).
        quantity: ``"prediction"`` (the raw network output) or ``"score"`` (∇ log p_t).
        chunk_size: JVP directions per forward pass.
        max_conditioners: refuse larger conditioner sets (cost grows linearly in ``k``).

    Returns:
        :class:`ProbeResult` with maps ``"jvp"``/``"ablation"`` ``(T, k, H, W)``, ``"attribution"``
        ``(T, k, C, H, W)``, ``"n_eff_<map>"`` ``(T, H, W)``; rows ``in_region``, ``leak_other``,
        ``leak_background``, ``mass`` per ``(t, conditioner, map)`` and ``n_eff`` per ``(t, map)``.
    """
    check_conditioning(cond, max_k=max_conditioners)
    unknown = set(maps) - {"jvp", "ablation", "attribution"}
    if unknown or not maps:
        raise ValueError(f"maps must be a non-empty subset of ('jvp', 'ablation', 'attribution'); got {tuple(maps)}")
    if branch not in ("cond", "guided"):
        raise ValueError("branch must be 'cond' or 'guided' (the unconditional branch does not depend on c_j)")
    scale = float(den.guidance_scale or 1.0) if branch == "guided" else 1.0
    if radius is not None and cond.locations is not None:
        check_locations(cond.locations)
    inputs = noisy_inputs(den, t, seeds, x_t=x_t, timestep=timestep, x0=x0, shape=shape, dtype=dtype)
    levels = [level for level, _, _ in inputs]
    seed_list = as_seeds(seeds) if x_t is None else "x_t given"
    if baseline is not None and baseline.shape != cond.tokens.shape:
        raise ValueError(f"baseline must be {tuple(cond.tokens.shape)} like cond.tokens, got {tuple(baseline.shape)}")
    cond = cond.to(den.device)
    result = ProbeResult(
        "conditional_locality",
        metadata={**den.metadata(), "site": "output", "branch": branch, "quantity": quantity, "directions": str(directions),
                  "radius": radius, "seeds": seed_list, "n_samples": int(inputs[0][1].shape[0]), "k": cond.k,
                  "levels": levels},
    )
    out_maps: dict[str, list[Tensor]] = {m: [] for m in maps}
    for level, xs, ts in inputs:
        acc = accumulation_dtype(xs)
        per = {m: [] for m in maps}
        if "jvp" in maps or "attribution" in maps:
            with forward_mode_ready(den.unet):
                for j in range(cond.k):
                    if "jvp" in maps:
                        v, factor = direction_set(cond, j, directions, seed=j)
                        sq = torch.stack([
                            conditioner_jvp(den, cond, v, x_t=xs[s : s + 1], timestep=ts, quantity=quantity,
                                            chunk_size=chunk_size).pow(2).sum((0, 1))
                            for s in range(xs.shape[0])
                        ])  # (S, H, W)
                        per["jvp"].append(abs(scale) * (sq * factor).sqrt().mean(0))
                    if "attribution" in maps:
                        b = baseline.to(cond.tokens) if baseline is not None else torch.zeros_like(cond.tokens)
                        d = torch.zeros_like(cond.tokens)
                        idx = cond.token_indices(j)
                        d[idx] = cond.tokens[idx] - b[idx]
                        att = torch.stack([conditioner_jvp(den, cond, d[None], x_t=xs[s : s + 1], timestep=ts, quantity=quantity)[0]
                                           for s in range(xs.shape[0])])
                        per["attribution"].append(scale * att.mean(0))
        if "ablation" in maps:
            full = _branch_out(den, xs, ts, cond, branch, quantity).to(acc)
            for j in range(cond.k):
                dropped = _branch_out(den, xs, ts, cond.drop(j), branch, quantity).to(acc)
                per["ablation"].append((full - dropped).pow(2).sum(1).sqrt().mean(0))
        for m in maps:
            stacked = torch.stack(per[m])  # (k, H, W) or (k, C, H, W)
            out_maps[m].append(stacked)
            mass_map = stacked.abs().sum(1) if m == "attribution" else stacked
            _summarise(result, mass_map, cond, radius, t=level, timestep=int(ts), map_name=m)
    for m in maps:
        result.maps[m] = torch.stack(out_maps[m]).float()
        result.axes[m] = ("t", "conditioner", "c_out", "row", "col") if m == "attribution" else ("t", "conditioner", "row", "col")
        mass = result.maps[m].abs().sum(2) if m == "attribution" else result.maps[m]
        result.maps[f"n_eff_{m}"] = torch.stack([effective_conditioners(g)[0] for g in mass]).float()
        result.axes[f"n_eff_{m}"] = ("t", "row", "col")
    return result


def _branch_out(den: Denoiser, x: Tensor, t: Tensor, cond: Conditioning, branch: str, quantity: Quantity) -> Tensor:
    with torch.no_grad():
        return evaluate(den, x, t, cond, branch=branch, quantity=quantity)  # type: ignore[arg-type]


def _summarise(result: ProbeResult, g: Tensor, cond: Conditioning, radius: float | None, **index: object) -> None:
    """Rows of region fractions (when locations are known) and the effective number of conditioners."""
    total = g.flatten(1).sum(-1)
    for j in range(cond.k):
        result.add("mass", float(total[j]), conditioner=j, label=cond.labels[j], **index)
    if radius is not None and cond.locations is not None:
        fr = region_fractions(g, cond.locations, radius)
        for name, vals in fr.items():
            for j in range(cond.k):
                result.add(name, float(vals[j]), conditioner=j, label=cond.labels[j], **index)
    _, mean = effective_conditioners(g)
    result.add("n_eff", float(mean), **index)
