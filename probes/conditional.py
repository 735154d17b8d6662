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

**Forward or reverse mode** (``mode=``). Every derivative map is a set of directional derivatives
``(∂D/∂tokens)·v`` (all pixels and channels at once), computed by one of three equal methods:

* ``"forward"``: ``torch.func.jvp``, one tangent per direction (batched ``chunk_size`` at a time);
* ``"reverse"``: the double-backward trick — one forward and one backward with ``create_graph`` give the
  linear map ``u ↦ uᵀJ``; each direction is then one backward of that map (``Jv = ∂⟨uᵀJ, v⟩/∂u``, batched
  by ``torch.func.vmap``);
* ``"rows"``: the full token Jacobian from one VJP per output element (``C·H·W`` rows, every conditioner at
  once), then ``J·v`` by a matrix product.

``mode="auto"`` (default) is a cost model: when the output has fewer rows (``C·H·W`` of ``x_t``) than there are
directions over all conditioners, ``"rows"``; otherwise ``"reverse"`` on the CPU — measured 1.6–2.1× faster
than forward mode on the shipped exp1 checkpoint for the attribution and 8-direction JVP maps (forward-mode rules
of GroupNorm / LayerNorm are Python-level decompositions, and tangent convolutions fall back to a slow kernel;
``docs/bench/speed.json``) — and ``"forward"`` on CUDA (unmeasured: no GPU here; forward mode keeps no backward
graph and batches wide).
The mode that ran is in ``result.metadata["mode"]``. All three give the same maps to float rounding (tested).
Parameters never require grad while the maps are computed (:func:`interp.forward_mode.frozen_parameters`).

Summaries (*ours*, :mod:`probes.summaries`): in-region fraction within radius ``r`` of ``c_j``'s location,
leakage to pixels nearer another conditioner or to background, and the effective number of conditioners
per pixel.

Branches: ``"cond"`` differentiates the conditional prediction; ``"guided"`` is ``s ×`` that, since the
null condition holds no conditioner tokens (``Conditioning.null()``); ``"uncond"`` does not depend on c_j.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from interp import Conditioning, ConditioningBatch, Denoiser
from interp.forward_mode import forward_chunk_default, forward_mode_ready, frozen_parameters, model_device
from interp.inputs import as_seeds, check_conditioning, check_locations, noisy_inputs, resolve_timestep
from interp.validation import check_finite
from interp.compat import renamed_kwargs
from interp.evaluate import Quantity, accumulation_dtype, evaluate
from interp.results import ProbeResult
from probes.summaries import effective_conditioners, region_fractions

Maps = Sequence[Literal["jvp", "ablation", "attribution"]]
Mode = Literal["auto", "forward", "reverse", "rows"]
MODES = ("auto", "forward", "reverse", "rows")


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
    chunk_size: int | None = None,
) -> Tensor:
    """``(∂D/∂tokens)·v`` for each tangent ``v`` in ``tangents (N, L, D)`` at one input ``x_t (1, C, H, W)``, forward mode.

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
    chunk_size = chunk_size or forward_chunk_default(model_device(den.unet))
    for start in range(0, tangents.shape[0], chunk_size):
        v = tangents[start : start + chunk_size]
        f = token_function(den, x, ts, cond, v.shape[0], quantity=quantity)
        primal = cond.tokens.unsqueeze(0).expand(v.shape[0], -1, -1).clone()
        _, tan = torch.func.jvp(f, (primal,), (v.to(primal.dtype),))
        outs.append(tan.detach().to(acc))
    return torch.cat(outs)


def choose_mode(n_directions: int, n_rows: int, device: torch.device | str) -> str:
    """The cost model of ``mode="auto"`` (see the module docstring).

    ``"rows"`` when the output has fewer rows than there are directions (one VJP per row then serves every
    direction), else ``"reverse"`` on the CPU and ``"forward"`` on CUDA.
    """
    if n_rows < n_directions:
        return "rows"
    return "forward" if torch.device(device).type == "cuda" else "reverse"


class TokenDerivative:
    """``deriv(V (N, L, D)) -> (N, C, H, W)``: ``(∂D/∂tokens)·v`` of the conditional branch at one input, by ``mode``.

    ``"reverse"`` and ``"rows"`` linearise once, on the first call, and reuse that for every later call (one
    object per input ``x``). Results are in the accumulation dtype (float32, float64 for float64 ``x``).
    Differentiate diffusers models inside :func:`interp.forward_mode.forward_mode_ready`.
    """

    def __init__(self, den: Denoiser, cond: Conditioning, x: Tensor, timestep: Tensor, *, mode: str,
                 quantity: Quantity = "prediction", chunk_size: int | None = None) -> None:
        if mode not in MODES[1:]:
            raise ValueError(f"mode must be one of {MODES[1:]} here (resolve 'auto' with choose_mode), got {mode!r}")
        self.den, self.cond, self.x, self.timestep, self.mode, self.quantity = den, cond, x, timestep, mode, quantity
        self.chunk_size = chunk_size or forward_chunk_default(model_device(den.unet))
        self.acc = accumulation_dtype(x)
        self._lin: tuple[Tensor, Tensor] | None = None
        self._rows: Tensor | None = None

    def __call__(self, V: Tensor) -> Tensor:
        if self.mode == "forward":
            return conditioner_jvp(self.den, self.cond, V, x_t=self.x, timestep=self.timestep, quantity=self.quantity,
                                   chunk_size=self.chunk_size)
        if self.mode == "reverse":
            return self._reverse(V)
        J = self._token_rows()  # (C, H, W, L, D)
        return torch.einsum("chwld,nld->nchw", J, V.to(J)).to(self.acc)

    def _primal(self) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        f = token_function(self.den, self.x, self.timestep, self.cond, 1, quantity=self.quantity)
        return f, self.cond.tokens.detach()[None].clone()

    def _reverse(self, V: Tensor) -> Tensor:
        if self._lin is None:
            f, tok = self._primal()
            tok.requires_grad_(True)
            # Frozen while the graphs are built: neither the forward's nor the backward's graph tracks weights.
            with frozen_parameters(self.den.unet), torch.enable_grad():
                out = f(tok)
                check_finite("model output", out)
                u = torch.zeros_like(out, requires_grad=True)
                (g,) = torch.autograd.grad(out, tok, u, create_graph=True, allow_unused=True, materialize_grads=True)
            self._lin = (g, u)  # g = uᵀJ (1, L, D), linear in u
        g, u = self._lin
        if not g.requires_grad:  # the output does not depend on the tokens
            return torch.zeros(V.shape[0], *u.shape[1:], dtype=self.acc, device=u.device)
        from probes.jacobian import vjp_of  # sibling module of the same verb

        pull = torch.func.vmap(lambda v: vjp_of(g, u, v))
        return torch.cat([pull(V[start : start + self.chunk_size].to(g.dtype).unsqueeze(1)).squeeze(1).detach().to(self.acc)
                          for start in range(0, V.shape[0], self.chunk_size)])

    def _token_rows(self) -> Tensor:
        if self._rows is None:
            from probes.jacobian import RowEngine  # sibling module of the same verb

            f, tok = self._primal()
            eng = RowEngine(f, tok, freeze=(self.den.unet,))
            shape = eng.out.shape[1:]
            R = shape.numel()
            rows = []
            for start in range(0, R, 256):  # identity cotangents in blocks: never an R×R matrix at once
                n = min(256, R - start)
                cot = torch.zeros(n, R, dtype=eng.out.dtype, device=eng.out.device)
                cot[torch.arange(n), torch.arange(start, start + n)] = 1
                rows.append(eng(cot.reshape(n, *shape)).to(self.acc))  # (n, L, D)
            self._rows = torch.cat(rows).reshape(*shape, *tok.shape[1:])
        return self._rows


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
    chunk_size: int | None = None,
    max_conditioners: int = 64,
    dtype: torch.dtype = torch.float32,
    mode: Mode = "auto",
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
        chunk_size: directions per batched pass (default 8 on the CPU, 64 on CUDA).
        max_conditioners: refuse larger conditioner sets (cost grows linearly in ``k``).
        mode: how the derivative maps are computed: ``"auto"`` (the cost model of the module docstring),
            or force ``"forward"``, ``"reverse"`` or ``"rows"``; all give the same maps. The mode that ran is
            ``result.metadata["mode"]`` (``None`` for ablation only).

    Returns:
        :class:`ProbeResult` with maps ``"jvp"``/``"ablation"`` ``(T, k, H, W)``, ``"attribution"``
        ``(T, k, C, H, W)``, ``"n_eff_<map>"`` ``(T, H, W)``; rows ``in_region``, ``leak_other``,
        ``leak_background``, ``mass`` per ``(t, conditioner, map)`` and ``n_eff`` per ``(t, map)``.
    """
    check_conditioning(cond, max_k=max_conditioners)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    unknown = set(maps) - {"jvp", "ablation", "attribution"}
    if unknown or not maps:
        raise ValueError(f"maps must be a non-empty subset of ('jvp', 'ablation', 'attribution'); got {tuple(maps)}")
    if branch not in ("cond", "guided"):
        raise ValueError("branch must be 'cond' or 'guided' (the unconditional branch does not depend on c_j)")
    if set(maps) - {"ablation"}:
        den.check_token_derivative()  # DiT: class ids have no derivative (ablation still works)
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
    modes_used: set[str] = set()
    for level, xs, ts in inputs:
        acc = accumulation_dtype(xs)
        per = {m: [] for m in maps}
        if "jvp" in maps or "attribution" in maps:
            jvp_sets = [direction_set(cond, j, directions, seed=j) for j in range(cond.k)] if "jvp" in maps else []
            if "attribution" in maps:
                b = baseline.to(cond.tokens) if baseline is not None else torch.zeros_like(cond.tokens)
                moves = torch.zeros(cond.k, *cond.tokens.shape, dtype=cond.tokens.dtype, device=cond.tokens.device)
                for j in range(cond.k):
                    idx = cond.token_indices(j)
                    moves[j, idx] = cond.tokens[idx] - b[idx]
            n_dirs = sum(v.shape[0] for v, _ in jvp_sets) + (cond.k if "attribution" in maps else 0)
            used = choose_mode(n_dirs, xs[0].numel(), model_device(den.unet)) if mode == "auto" else mode
            modes_used.add(used)
            sq = [[] for _ in jvp_sets]  # per conditioner, per sample: Σ_v Σ_c (J v)²  (H, W)
            att = []  # per sample: (k, C, H, W)
            with forward_mode_ready(den.unet), frozen_parameters(den.unet):
                for s in range(xs.shape[0]):
                    deriv = TokenDerivative(den, cond, xs[s : s + 1], ts, mode=used, quantity=quantity, chunk_size=chunk_size)
                    if "attribution" in maps:
                        att.append(deriv(moves))  # all conditioners in one batch
                    for j, (v, _) in enumerate(jvp_sets):
                        sq[j].append(deriv(v).pow(2).sum((0, 1)))
            for j, (_, factor) in enumerate(jvp_sets):
                per["jvp"].append(abs(scale) * (torch.stack(sq[j]) * factor).sqrt().mean(0))
            if att:
                mean_att = torch.stack(att).mean(0)  # (k, C, H, W)
                per["attribution"] = [scale * mean_att[j] for j in range(cond.k)]
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
    result.metadata["mode"] = next(iter(modes_used)) if modes_used else None
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
