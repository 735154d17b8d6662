"""Feature-space conditioner dependence: the conditional-locality measures on a layer's activation.

The paper's feature-space claim (SCIENCE.md §1, §3.4): even where the *pixel* score is not conditionally
local (SDXL, overlapping concepts), it can be local in the coordinates of a learned feature ``z = A(x)``.
So we take the maps of :mod:`probes.conditional` and :mod:`probes.cpc` on the activation ``h_L`` at a site
``L`` (read differentiably with :func:`interp.capture.read_activation`, which stops the forward right
after the site) instead of the output:

* :func:`feature_dependence` — per position *and channel* ``‖∂h_L/∂c_j‖`` (JVP, one pass per direction
  gives every position and channel) and the ablation ``|h_L(c) − h_L(c∖j)|``; spatial summaries (in-region
  fraction, leakage, effective number of conditioners, over the channel norm), **sparsity** of each
  conditioner's dependence over (channel, position) entries (Hoyer; fraction of entries / channels
  holding 95 % of the mass), and the feature-space CPC residual.
* :func:`layer_dependence` — the per-channel JVP norms at *several* sites from one forward-mode pass per
  chunk of directions (what a layer × noise-level profile needs).
* :func:`concept_cosines` — the ``d_i = μ_i − μ_∅`` cosine matrix of a set of concepts (mean activation
  under concept ``i`` alone minus under the null condition): blocks of near-zero cosines across concept
  families are the necessary condition for feature-space composition.
* :func:`linear_probe_map` — L1-regularised logistic regressions (scikit-learn), one per spatial position,
  predicting a conditioner attribute from the channel vector there: a cross-validated accuracy map and
  the coefficient sparsity show *where* and *how locally* the attribute is encoded.

Token activations ``(B, N, C)`` are viewed as ``(B, C, h, w)`` with :func:`interp.site.spatial_view`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from interp import Conditioning, ConditioningBatch, Denoiser
from interp.site import resolve_paths, spatial_view
from probes.conditional import _summarise, direction_set
from interp.masks import composition_masks, masked_composition
from interp.forward_mode import forward_mode_ready
from interp.inputs import as_seeds, check_conditioning, check_locations, forward_samples, noisy_inputs
from interp.evaluate import accumulation_dtype
from interp.results import ProbeResult
from probes.summaries import hoyer_sparsity, support_fraction


def exact_site(den: Denoiser, site: str) -> str:
    """The one module path ``site`` names (a glob must match exactly one module)."""
    hits = resolve_paths(den.unet, site)
    if len(hits) != 1:
        names = ", ".join(p for p, _ in hits[:6])
        raise ValueError(f"site {site!r} matches {len(hits)} modules ({names}, ...); pass one path "
                         "(probes.locality_sweep loops over globs)")
    return hits[0][0]


def activation(den: Denoiser, site: str, cond: Any, *, x_t: Tensor, timestep: Tensor) -> Tensor:
    """``h_L`` at ``site`` as a spatial map ``(B, C_L, h, w)`` (differentiable) for inputs ``x_t (B, C, H, W)``."""
    from interp.capture import read_activation

    return _spatial(read_activation(den, site, cond, x_t=x_t, timestep=timestep), site, tuple(x_t.shape[-2:]))


def _token_activations_fn(den: Denoiser, paths: Sequence[str], x: Tensor, timestep: Tensor, cond: Conditioning, n: int):
    """``f(tokens (n, L, D)) -> tuple of (n, C_L, h, w)``: every site's activation at one input ``x (1, C, H, W)``."""
    from interp.capture import read_activations

    one = ConditioningBatch.stack([cond]).repeat(n)
    xs = x.expand(n, *x.shape[1:]).contiguous()
    hw = tuple(x.shape[-2:])

    def f(tokens: Tensor) -> tuple[Tensor, ...]:
        acts = read_activations(den, list(paths), one.with_tokens(tokens), x_t=xs, timestep=timestep)
        return tuple(_spatial(acts[p], p, hw) for p in paths)

    return f


def _spatial(act: Tensor, site: str, hw: tuple[int, ...]) -> Tensor:
    if act.dim() == 4:
        return act
    try:
        return spatial_view(act, hw)  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"the activation at {site!r} has shape {tuple(act.shape)}, not a spatial map: {err}") from None


def layer_dependence(
    den: Denoiser,
    sites: Sequence[str],
    cond: Conditioning,
    conditioner: int,
    *,
    x_t: Tensor,
    timestep: Tensor,
    directions: int | str = 8,
    chunk_size: int = 8,
) -> dict[str, Tensor]:
    """``‖∂h_L/∂c_j‖`` per channel and position at several sites at once, for one input.

    One forward-mode pass per chunk of directions gives the tangent at *every* site (the forward stops after
    the last site runs), so profiling many layers costs about one network pass per chunk, not one per layer.

    Args:
        den: the denoiser. sites: exact module paths (:func:`exact_site`).
        cond: the conditioning; ``conditioner``: the index ``j`` differentiated.
        x_t: one input ``(1, C, H, W)``; timestep: its training timestep (0-d).
        directions: ``"all"`` coordinate directions of ``c_j``'s tokens (exact Frobenius norm) or ``n`` random
            Gaussian ones (unbiased for the square; seeded with ``j``: :func:`probes.conditional.direction_set`).
        chunk_size: directions per forward pass.

    Returns:
        ``{path: (C_L, h, w)}`` in the accumulation dtype of ``x_t`` (float64 for float64 inputs).
    """
    if x_t.dim() != 4 or x_t.shape[0] != 1:
        raise ValueError(f"x_t must be one input (1, C, H, W), got {tuple(x_t.shape)}")
    den.check_token_derivative()
    paths = list(sites)
    acc = accumulation_dtype(x_t)
    v, factor = direction_set(cond, conditioner, directions, seed=conditioner)
    sq: list[Tensor | float] = [0.0] * len(paths)
    with forward_mode_ready(den.unet):
        for start in range(0, v.shape[0], chunk_size):
            vc = v[start : start + chunk_size]
            f = _token_activations_fn(den, paths, x_t, timestep, cond, vc.shape[0])
            primal = cond.tokens.unsqueeze(0).expand(vc.shape[0], -1, -1).clone()
            _, tans = torch.func.jvp(f, (primal,), (vc,))
            sq = [s + tan.detach().to(acc).pow(2).sum(0) for s, tan in zip(sq, tans)]
    return {p: (s * factor).sqrt() for p, s in zip(paths, sq)}  # type: ignore[union-attr]


def feature_dependence(
    den: Denoiser,
    site: str,
    cond: Conditioning,
    t: float | Sequence[float] | None = None,
    seeds: int | Sequence[int] = 2,
    *,
    x_t: Tensor | None = None,
    timestep: Tensor | float | int | None = None,
    maps: Sequence[Literal["jvp", "ablation"]] = ("jvp", "ablation"),
    directions: int | str = 8,
    radius: float | None = 0.2,
    cpc: bool = True,
    x0: Tensor | None = None,
    shape: Sequence[int] | None = None,
    chunk_size: int = 8,
    keep_channels: bool = True,
    dtype: torch.dtype = torch.float32,
) -> ProbeResult:
    """Conditioner dependence of the activation at one site, per position and channel.

    Args:
        den: the denoiser. site: one module path (or a glob matching one module).
        cond: conditioning with ``k >= 1`` conditioners.
        t, seeds, x0, shape, dtype: forward-process inputs (``t``: noise fractions in ``[0, 1]``).
        x_t / timestep: explicit inputs ``(S, C, H, W)`` and their noise level (``t`` one fraction, or
            ``timestep``) instead of forward-process samples (:func:`interp.inputs.noisy_inputs`).
        maps: ``"jvp"`` (‖∂h/∂c_j‖ per channel and position) and/or ``"ablation"`` (|h(c) − h(c∖j)|).
        directions: ``"all"`` coordinate directions (exact norm) or a number of random ones (unbiased
            for the squared norm; default 8 — *ours*, a cost choice for sweeps).
        radius: region radius for the location summaries and the CPC masks, in normalised Euclidean units
            (a fraction of the image side, the same at every layer's resolution).
        cpc: also compute the feature-space CPC residual (needs locations).
        chunk_size: JVP directions per forward pass.
        keep_channels: keep the per-channel maps (``(T, k, C_L, h, w)``); else only channel norms.

    Returns:
        :class:`ProbeResult` with maps ``"<map>_channels" (T, k, C_L, h, w)`` and ``"<map>" (T, k, h, w)``
        (channel norm); rows ``in_region, leak_other, leak_background, mass, n_eff, hoyer, support_95,
        channel_support_95`` per ``(t, conditioner, map_name)`` and ``feature_cpc_residual`` per ``t``.
    """
    check_conditioning(cond)
    path = exact_site(den, site)
    if cond.locations is not None and (radius is not None or cpc):
        check_locations(cond.locations)
    inputs = noisy_inputs(den, t, seeds, x_t=x_t, timestep=timestep, x0=x0, shape=shape, dtype=dtype)
    levels = [level for level, _, _ in inputs]
    # Rows are per sample: the seed when inputs come from the forward process, the sample index otherwise.
    seed_list = as_seeds(seeds) if x_t is None else list(range(x_t.shape[0]))
    cond = cond.to(den.device)
    result = ProbeResult(
        "feature_dependence",
        metadata={**den.metadata(), "site": path, "directions": str(directions), "radius": radius, "k": cond.k,
                  "seeds": seed_list if x_t is None else "x_t given", "n_samples": len(seed_list), "levels": levels},
    )
    store: dict[str, list[Tensor]] = {m: [] for m in maps}
    for level, x_t, ts in inputs:
        acc = accumulation_dtype(x_t)
        per: dict[str, list[Tensor]] = {m: [] for m in maps}
        if "jvp" in maps:
            for j in range(cond.k):
                norms = [layer_dependence(den, [path], cond, j, x_t=x_t[s : s + 1], timestep=ts, directions=directions,
                                          chunk_size=chunk_size)[path] for s in range(x_t.shape[0])]
                per["jvp"].append(torch.stack(norms).mean(0))  # (C_L, h, w): the mean over samples of the norm
        if "ablation" in maps or (cpc and cond.locations is not None):
            with torch.no_grad():
                full = activation(den, path, cond, x_t=x_t, timestep=ts).to(acc)
                if "ablation" in maps:
                    for j in range(cond.k):
                        per["ablation"].append((full - activation(den, path, cond.drop(j), x_t=x_t, timestep=ts).to(acc)).abs().mean(0))
                if cpc and cond.locations is not None:
                    null = activation(den, path, cond.null(), x_t=x_t, timestep=ts).to(acc)
                    masks = composition_masks(cond.locations, tuple(full.shape[-2:]), radius or 0.2).to(full.device)
                    singles = [activation(den, path, cond.only(j), x_t=x_t, timestep=ts).to(acc) for j in range(cond.k)]
                    diff = full - masked_composition(null, singles, masks)
                    rho = diff.flatten(1).norm(dim=1) / (full - null).flatten(1).norm(dim=1).clamp_min(1e-30)
                    for s, seed in enumerate(seed_list):
                        result.add("feature_cpc_residual", float(rho[s]), t=level, timestep=int(ts), seed=seed)
                    result.add("feature_cpc_residual", float(rho.mean()), t=level, timestep=int(ts), stat="mean")
        for m in maps:
            chans = torch.stack(per[m])  # (k, C_L, h, w)
            store[m].append(chans)
            spatial = chans.pow(2).sum(1).sqrt()
            idx = dict(t=level, timestep=int(ts), map_name=m)
            _summarise(result, spatial, cond, radius, **idx)
            for j in range(cond.k):
                lab = dict(conditioner=j, label=cond.labels[j], **idx)
                result.add("hoyer", float(hoyer_sparsity(chans[j])), **lab)
                result.add("support_95", float(support_fraction(chans[j], 0.95)), **lab)
                result.add("channel_support_95", float(support_fraction(chans[j].flatten(1).sum(1), 0.95)), **lab)
    for m in maps:
        full_maps = torch.stack(store[m]).float()  # (T, k, C_L, h, w)
        result.maps[m] = full_maps.pow(2).sum(2).sqrt()
        result.axes[m] = ("t", "conditioner", "row", "col")
        if keep_channels:
            result.maps[f"{m}_channels"] = full_maps
            result.axes[f"{m}_channels"] = ("t", "conditioner", "channel", "row", "col")
    return result


def concept_cosines(
    den: Denoiser,
    site: str,
    concepts: Mapping[str, Conditioning],
    t: float,
    seeds: int | Sequence[int] = 4,
    *,
    null: Conditioning | None = None,
    x0: Tensor | None = None,
    shape: Sequence[int] | None = None,
) -> ProbeResult:
    """Cosine matrix of the concept directions ``d_i = μ_i − μ_∅`` at a site.

    Args:
        den: the denoiser. site: one module path.
        concepts: name → conditioning of that concept alone (e.g. a colour, a prompt phrase).
        t: one noise fraction. seeds: forward-process samples shared by every concept.
        null: the null conditioning (default: the first concept's ``.null()``).

    Returns:
        :class:`ProbeResult` with maps ``"cosine" (n, n)`` (symmetric, unit diagonal), ``"norms" (n,)`` and one
        row per ordered pair (``metric="cosine"``, ``concept_a``, ``concept_b``).

    Raises:
        ValueError: fewer than two concepts, or a concept whose difference vector is zero (no direction, so
            no cosine; named in the message) instead of a NaN cosine.
    """
    if len(concepts) < 2:
        raise ValueError("concept_cosines needs at least two concepts")
    path = exact_site(den, site)
    seed_list = as_seeds(seeds)
    x_t, ts = forward_samples(den, t, seed_list, x0=x0, shape=shape)
    names = list(concepts)
    null = null if null is not None else next(iter(concepts.values())).null()
    with torch.no_grad():
        mu_b = activation(den, path, null.to(den.device), x_t=x_t, timestep=ts).double().mean(0).flatten()
        d = torch.stack([activation(den, path, concepts[n].to(den.device), x_t=x_t, timestep=ts).double().mean(0).flatten() - mu_b for n in names])
    norms = d.norm(dim=1)
    # A concept whose mean activation equals the null's has no direction: its cosine would be 0/0. The
    # tolerance is relative to the activations' own scale (float32 activations averaged in float64).
    scale = torch.maximum(mu_b.norm(), norms.max()).item()
    flat = [n for n, v in zip(names, norms.tolist()) if v <= 1e-10 * scale or v == 0.0]
    if flat:
        raise ValueError(
            f"concept(s) {flat} have a zero difference vector d_i = mu_i - mu_null at site {path!r} (t={t}): their "
            "activation does not change from the null condition, so the cosine is undefined; drop them, or "
            "choose another site or noise level"
        )
    cos = (d @ d.T) / (norms[:, None] * norms[None, :])
    # Symmetric with a unit diagonal by construction (a BLAS Gram matrix need not be bit-symmetric).
    cos = ((cos + cos.T) / 2).clamp(-1.0, 1.0)
    cos.fill_diagonal_(1.0)
    result = ProbeResult("concept_cosines", metadata={**den.metadata(), "site": path, "t": t, "timestep": int(ts),
                                                      "seeds": seed_list, "n_samples": len(seed_list)})
    for a, na in enumerate(names):
        for b, nb in enumerate(names):
            result.add("cosine", float(cos[a, b]), concept_a=na, concept_b=nb)
    result.maps["cosine"] = cos.float()
    result.axes["cosine"] = ("concept", "concept")
    result.maps["norms"] = norms.float()
    result.axes["norms"] = ("concept",)
    result.metadata["concepts"] = names
    return result


def linear_probe_map(
    den: Denoiser,
    site: str,
    conds: Sequence[Conditioning],
    labels: Sequence[Any],
    t: float,
    seeds: int | Sequence[int] = 1,
    *,
    C: float = 1.0,
    folds: int = 3,
    x0: Tensor | None = None,
    shape: Sequence[int] | None = None,
    seed: int = 0,
) -> ProbeResult:
    """L1-regularised linear probes of a conditioner attribute at every spatial position of a site.

    For each scene ``n`` (a conditioning with attribute label ``labels[n]``) and seed, the activation
    ``h_L (C_L, h, w)`` is read; at each position a logistic regression with an L1 penalty (inverse
    strength ``C``, scikit-learn ``liblinear``) predicts the label from the ``C_L`` channels.

    Returns:
        :class:`ProbeResult` with maps ``"accuracy" (h, w)`` (stratified ``folds``-fold cross-validated),
        ``"nonzero_fraction" (h, w)`` (coefficients ≠ 0 of the fit on all data); rows ``accuracy``,
        ``nonzero_fraction`` (means over positions), ``accuracy_max``, ``chance``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    if len(conds) != len(labels):
        raise ValueError(f"{len(conds)} conditionings but {len(labels)} labels")
    path = exact_site(den, site)
    seed_list = as_seeds(seeds)
    x_t, ts = forward_samples(den, t, seed_list, x0=x0, shape=shape)
    feats, ys = [], []
    with torch.no_grad():
        for c, y in zip(conds, labels):
            h = activation(den, path, c.to(den.device), x_t=x_t, timestep=ts).double().cpu().numpy()  # (S, C_L, h, w)
            feats.append(h)
            ys += [y] * h.shape[0]
    X = np.concatenate(feats)  # (N, C_L, h, w)
    y = np.asarray(ys)
    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2:
        raise ValueError("linear probes need at least two distinct labels")
    n_folds = int(min(folds, counts.min()))
    if n_folds < 2:
        raise ValueError(f"every label needs at least 2 examples for cross-validation; counts {dict(zip(classes, counts))}")
    N, CL, hh, ww = X.shape
    acc = np.zeros((hh, ww))
    nz = np.zeros((hh, ww))
    cv = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for r in range(hh):
        for q in range(ww):
            Xi = X[:, :, r, q]
            Xi = (Xi - Xi.mean(0)) / (Xi.std(0) + 1e-8)
            clf = LogisticRegression(l1_ratio=1.0, C=C, solver="liblinear", random_state=seed) if _l1_ratio_api() else \
                LogisticRegression(penalty="l1", C=C, solver="liblinear", random_state=seed)
            acc[r, q] = cross_val_score(clf, Xi, y, cv=cv).mean()
            clf.fit(Xi, y)
            nz[r, q] = float((np.abs(clf.coef_) > 0).mean())
    result = ProbeResult("linear_probe_map", metadata={**den.metadata(), "site": path, "t": t, "timestep": int(ts), "C": C,
                                                       "folds": n_folds, "n_examples": int(N)})
    result.add("accuracy", float(acc.mean()), t=t)
    result.add("accuracy_max", float(acc.max()), t=t)
    result.add("nonzero_fraction", float(nz.mean()), t=t)
    result.add("chance", float(counts.max() / counts.sum()), t=t)
    result.maps["accuracy"] = torch.from_numpy(acc).float()
    result.axes["accuracy"] = ("row", "col")
    result.maps["nonzero_fraction"] = torch.from_numpy(nz).float()
    result.axes["nonzero_fraction"] = ("row", "col")
    return result


def _l1_ratio_api() -> bool:
    """scikit-learn >= 1.8 deprecates ``penalty=`` in favour of ``l1_ratio``."""
    import sklearn

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    return (major, minor) >= (1, 8)
