"""Pixel locality: rows of the Jacobian ∂D_i/∂x of the denoiser's output with respect to its input.

The row of output element ``(c_out, i)`` is one vector–Jacobian product (VJP) with the basis cotangent
``e_{c_out, i}``. We linearise the network once (``torch.func.vjp``) and push *chunks* of cotangents
through the pullback together (``torch.func.vmap``); the chunk size comes from a memory budget and the
measured size of the activations the backward pass keeps (one chunk row costs about one forward's
saved tensors). Niedoba et al.'s aggregate map (their Eq. 8) is then

    G(i, j) = E_{x_t}[ Σ_{c_out, c_in} |∂D_{c_out, i} / ∂x_{c_in, j}| ],

averaged over forward-process samples ``x_t`` (one per seed) and summarised by
:func:`probes.summaries.pixel_summaries`.

Precision: derivatives run in the model's own dtype (fp16 / bf16 models included, the input stays
float32 and the cast is differentiated); every reduction — absolute sums, the expectation over samples —
accumulates in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from interp import Conditioning, Denoiser
from interp.compat import renamed_kwargs
from interp.evaluate import Branch, Quantity, accumulation_dtype, evaluate
from interp.forward_mode import derivative_ready_default, forward_mode_ready, frozen_parameters, model_device
from interp.inputs import PixelSpec, as_seeds, noisy_inputs, pixel_list, resolve_timestep
from interp.results import ProbeResult
from interp.validation import check_finite, format_bytes, parse_bytes
from probes.summaries import DEFAULT_QUANTILES, pixel_summaries

__all__ = ["Branch", "Quantity", "RowEngine", "aggregate_map", "evaluate", "pixel_jacobian", "pixel_locality"]


def _keep(t: Tensor) -> Tensor:
    return t


def vjp_of(out: Tensor, x: Tensor, cotangent: Tensor) -> Tensor:
    """``cotangentᵀ · ∂out/∂x`` through a graph kept for more pulls (zeros where ``out`` ignores part of ``x``)."""
    (g,) = torch.autograd.grad(out, x, cotangent, retain_graph=True, allow_unused=True, materialize_grads=True)
    return g


def chunk_for_budget(per_row: int, memory_budget: int | str | None, device: torch.device) -> int:
    """Rows per batched VJP chunk so that one chunk fits ``memory_budget`` (default 1 GiB).

    ``per_row``: bytes one cotangent row costs in the backward (about one forward's saved tensors). On the CPU
    the chunk is capped at 32 rows (batching buys little there and large chunks are slower, PITFALLS.md); on
    GPU at 1,024.
    """
    budget = parse_bytes(memory_budget, "memory_budget") or 2**30
    if per_row > budget:
        raise MemoryError(
            f"one Jacobian row needs about {format_bytes(per_row)} of activations, more than the memory budget "
            f"{format_bytes(budget)}; raise memory_budget"
        )
    cap = 1024 if device.type == "cuda" else 32
    return int(max(1, min(cap, budget // per_row)))


class RowEngine:
    """Batched VJPs of one linearised call: ``engine(cotangents (N, C_out, H, W)) -> (N, C_in, H, W)``.

    (Any input ``(1, ...)`` works the same way: :mod:`probes.conditional` linearises in the tokens ``(1, L, D)``.)

    One forward builds the autograd graph of ``fn`` at ``x`` and, *in that same forward*, measures the bytes
    autograd saves for the backward, which sets the chunk size (no extra forward). While the graph is built
    the parameters of ``freeze`` do not require grad, so the graph holds only the input's path: a pullback
    then computes no parameter gradients and builds no higher-order graph (``requires_grad`` is restored
    as soon as the forward returns, on every exit path, :func:`interp.forward_mode.frozen_parameters`).
    Chunks of cotangents go through one batched backward each (``torch.func.vmap`` over
    ``torch.autograd.grad``: the same kernels as ``torch.func.vjp`` + ``vmap``).

    Args:
        fn: a function of one input ``(1, C_in, H, W)`` returning ``(1, C_out, H', W')``.
        x: the point of linearisation ``(1, C_in, H, W)``.
        chunk_size: cotangents per batched pullback (``None``: from ``memory_budget`` and the measured bytes).
        memory_budget: bytes (or ``"2GiB"``) one chunk may take.
        freeze: modules whose parameters ``fn`` reads (the denoiser's network).

    Attributes:
        out: the detached output ``(1, C_out, H', W')``.
        saved_bytes: bytes autograd saved in the forward (the per-row memory estimate).
        passes: number of backward passes (cotangent rows) pushed so far.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor, *, chunk_size: int | None = None,
                 memory_budget: int | str | None = None, freeze: Sequence[nn.Module] = ()) -> None:
        if x.dim() < 2 or x.shape[0] != 1:
            raise ValueError(f"linearise at one input (1, C, H, W) (or (1, ...) for a token input), got {tuple(x.shape)}")
        budget = parse_bytes(memory_budget, "memory_budget")  # a bad budget fails before the forward
        saved = 0

        def count(t: Tensor) -> Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        self._x = x.detach().requires_grad_(True)
        with frozen_parameters(*freeze), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(count, _keep):
            out = fn(self._x)
        self.saved_bytes = max(saved, x.numel() * x.element_size())
        self.chunk_size = int(chunk_size) if chunk_size else chunk_for_budget(self.saved_bytes, budget, x.device)
        check_finite("model output", out)
        self._graph = out if out.requires_grad else None  # an output that ignores x has zero rows
        self.out = out.detach()
        self.passes = 0

    def __call__(self, cotangents: Tensor) -> Tensor:
        if cotangents.shape[1:] != self.out.shape[1:]:
            raise ValueError(f"cotangents must be (N, {', '.join(map(str, self.out.shape[1:]))}), got {tuple(cotangents.shape)}")
        cot = cotangents.to(self.out.dtype).unsqueeze(1)
        self.passes += cot.shape[0]
        if self._graph is None:
            return torch.zeros(cot.shape[0], *self._x.shape[1:], dtype=self._x.dtype, device=self._x.device)
        # torch.func.vmap over the backward (not autograd.grad's is_grads_batched, whose older vmap prototype has
        # fewer batching rules and measured slower here).
        pull = torch.func.vmap(lambda c: vjp_of(self._graph, self._x, c))
        return torch.cat([pull(cot[start : start + self.chunk_size]).squeeze(1)
                          for start in range(0, cot.shape[0], self.chunk_size)])


def basis_cotangents(pixels: Tensor, shape: Sequence[int], *, dtype: torch.dtype, device: Any) -> Tensor:
    """``(P·C, C, H, W)`` one-hot cotangents, pixel-major: row ``p·C + c`` selects ``(c, pixels[p])``."""
    C, H, W = shape
    P = pixels.shape[0]
    cot = torch.zeros(P, C, C, H, W, dtype=dtype, device=device)
    ar = torch.arange(C, device=device)
    cot[torch.arange(P, device=device)[:, None], ar[None], ar[None], pixels[:, 0, None].to(device), pixels[:, 1, None].to(device)] = 1
    return cot.reshape(P * C, C, H, W)


def _legacy_positional(fn: str, den: Denoiser, cond: Any, args: tuple, x_t: Tensor | None, timestep: Any) -> tuple[Any, Tensor | None, Any]:
    """Accept the pre-0.2 positional call ``fn(den, x_t, timestep, cond)`` for one release, with a warning."""
    if not isinstance(cond, Tensor):
        if args:
            raise TypeError(f"{fn}() takes (den, cond) positionally; pass x_t=, t= / timestep= by keyword")
        return cond, x_t, timestep
    import warnings

    if len(args) != 2 or x_t is not None or timestep is not None:
        raise TypeError(f"{fn}(den, x_t, timestep, cond) is the old call; use {fn}(den, cond, x_t=x_t, timestep=timestep)")
    warnings.warn(
        f"{fn}(den, x_t, timestep, cond) is deprecated: call {fn}(den, cond, x_t=x_t, t=fraction) "
        "(or timestep=... for a raw training timestep)",
        DeprecationWarning,
        stacklevel=3,
    )
    return args[1], cond, args[0]


@renamed_kwargs(output="quantity")
def pixel_jacobian(
    den: Denoiser,
    cond: Conditioning,
    *legacy: Any,
    x_t: Tensor | None = None,
    t: float | None = None,
    timestep: Tensor | float | int | None = None,
    pixels: PixelSpec = "all",
    branch: Branch = "cond",
    quantity: Quantity = "prediction",
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    derivative_ready: bool | None = None,
) -> Tensor:
    """Dense Jacobian rows ``∂D_{c_out, i} / ∂x`` for the requested output pixels, at given inputs.

    Args:
        den: the denoiser.
        cond: the conditioning (broadcast over samples).
        x_t: ``(S, C, H, W)`` inputs (each sample is linearised separately).
        t / timestep: their noise level — a noise fraction ``t`` in ``[0, 1]`` or the raw training
            ``timestep`` (exactly one).
        pixels: ``"all"``, a grid stride, or integer ``(row, col)`` pairs (see :func:`interp.inputs.pixel_list`).
        branch / quantity: which function is differentiated (prediction or score, CFG branch).
        chunk_size / memory_budget: VJP batching (see :class:`RowEngine`).
        derivative_ready: differentiate inside :func:`interp.forward_mode.forward_mode_ready` (math SDPA).
            ``None`` (default): on for a model on CUDA, where the fused SDPA backward has no ``vmap`` batching
            rule, off on the CPU, where it was not slower (:func:`interp.forward_mode.derivative_ready_default`).

    Returns:
        ``(S, P, C_out, C_in, H, W)`` in the accumulation dtype (float32, float64 for float64 input).
    """
    cond, x_t, timestep = _legacy_positional("pixel_jacobian", den, cond, legacy, x_t, timestep)
    rows: list[list[Tensor]] = []
    for s, _, block in iter_jacobian_blocks(den, cond, x_t=x_t, t=t, timestep=timestep, pixels=pixels, branch=branch,
                                            quantity=quantity, chunk_size=chunk_size, memory_budget=memory_budget,
                                            derivative_ready=derivative_ready):
        if s == len(rows):
            rows.append([])
        rows[s].append(block)
    return torch.stack([torch.cat(r) for r in rows])


def iter_jacobian_blocks(
    den: Denoiser,
    cond: Conditioning,
    *,
    x_t: Tensor | None,
    t: float | None = None,
    timestep: Tensor | float | int | None = None,
    pixels: PixelSpec = "all",
    block: int = 256,
    branch: Branch = "cond",
    quantity: Quantity = "prediction",
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    derivative_ready: bool | None = None,
):
    """Yield ``(sample, pixel_slice, rows (p, C_out, C_in, H, W))`` for blocks of ``block`` output pixels.

    One linearisation per sample; callers that only need a reduction (Niedoba's ``G``) never hold more than
    one block of rows (a full SDXL-latent Jacobian, 4×128² rows of 4×128², would not fit in memory).
    """
    if not isinstance(x_t, Tensor) or x_t.dim() != 4:
        raise ValueError(f"x_t must be a (S, C, H, W) tensor, got {getattr(x_t, 'shape', type(x_t).__name__)}")
    # Inputs are checked here, before torch.func transforms hide NaNs from the Denoiser's own checks.
    check_finite("x_t", x_t)
    ts = resolve_timestep(den, t=t, timestep=timestep)
    px = pixel_list(pixels, tuple(x_t.shape[-2:]))
    acc = accumulation_dtype(x_t)
    with derivative_context(den, derivative_ready):
        for s in range(x_t.shape[0]):
            fn = lambda x: evaluate(den, x, ts, cond, branch=branch, quantity=quantity)  # noqa: E731
            eng = RowEngine(fn, x_t[s : s + 1], chunk_size=chunk_size, memory_budget=memory_budget, freeze=(den.unet,))
            C_out = eng.out.shape[1]
            for start in range(0, px.shape[0], block):
                sl = slice(start, min(start + block, px.shape[0]))
                cot = basis_cotangents(px[sl], eng.out.shape[1:], dtype=eng.out.dtype, device=eng.out.device)
                g = eng(cot).to(acc)
                yield s, sl, g.reshape(sl.stop - sl.start, C_out, *g.shape[1:])


def derivative_context(den: Denoiser, derivative_ready: bool | None) -> contextlib.AbstractContextManager:
    """:func:`interp.forward_mode.forward_mode_ready` when asked (``None``: by the model's device), else nothing."""
    if derivative_ready is None:
        derivative_ready = derivative_ready_default(model_device(den.unet))
    return forward_mode_ready(den.unet) if derivative_ready else contextlib.nullcontext()


def aggregate_map(jac: Tensor) -> Tensor:
    """Niedoba's ``G``: ``(S, P, C_out, C_in, H, W)`` → ``(P, H, W)`` = mean over samples of Σ_c |J|."""
    return jac.abs().sum(dim=(2, 3)).mean(0)


@renamed_kwargs(output="quantity", radius="radius_px")
def pixel_locality(
    den: Denoiser,
    cond: Conditioning,
    t: float | Sequence[float] | None = None,
    seeds: int | Sequence[int] = 4,
    *,
    x_t: Tensor | None = None,
    timestep: Tensor | float | int | None = None,
    pixels: PixelSpec = "all",
    x0: Tensor | None = None,
    shape: Sequence[int] | None = None,
    branch: Branch = "cond",
    quantity: Quantity = "prediction",
    method: Literal["dense", "compressed"] = "dense",
    radius_px: int | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    keep_jacobian: bool = False,
    dtype: torch.dtype = torch.float32,
) -> ProbeResult:
    """Pixel-locality maps ``G(i, ·)`` and their summaries, per noise level.

    Args:
        den: the denoiser. cond: its conditioning.
        t: noise fraction(s) in ``[0, 1]``.
        seeds: forward-process samples (a count or a list of seeds).
        x_t: explicit inputs ``(S, C, H, W)`` instead of forward-process samples; their noise level is ``t``
            (one fraction) or ``timestep`` (see :func:`interp.inputs.noisy_inputs`).
        pixels: output pixels ``i`` (``"all"``, a grid stride, or ``(row, col)`` pairs).
        x0: clean images the forward process starts from (default: zeros, see :mod:`interp.inputs`).
        shape: ``(C, H, W)`` for networks whose config does not say it.
        branch / quantity: CFG branch and prediction-or-score.
        method: ``"dense"`` (one VJP per row) or ``"compressed"`` (coloured probing for local models,
            certified, dense fallback; needs ``radius_px``, see :mod:`probes.compressed`).
        radius_px: hypothesised receptive-field radius in pixels (Chebyshev) for ``method="compressed"``.
        quantiles: mass fractions for the square-side and radius summaries.
        chunk_size / memory_budget: VJP batching.
        keep_jacobian: also return the full rows (``"jacobian"``: ``(T, S, P, C_out, C_in, H, W)``).
        dtype: dtype of ``x_t`` (use float64 with a float64 model for finite-difference checks).

    ``radius=`` and ``output=`` are the deprecated names of ``radius_px=`` and ``quantity=``.

    Returns:
        :class:`ProbeResult` with maps ``"G" (T, P, H, W)``, ``"pixels" (P, 2)`` and rows
        ``side_50, radius_50, ..., participation_ratio`` per ``(t, pixel_row, pixel_col)``, plus
        ``backward_passes`` per ``t``.
    """
    if method not in ("dense", "compressed"):
        raise ValueError(f"method must be 'dense' or 'compressed', got {method!r}")
    if method == "compressed" and radius_px is None:
        raise ValueError("method='compressed' needs radius_px= (the hypothesised receptive-field radius in pixels)")
    inputs = noisy_inputs(den, t, seeds, x_t=x_t, timestep=timestep, x0=x0, shape=shape, dtype=dtype)
    levels = [level for level, _, _ in inputs]
    seed_list = as_seeds(seeds) if x_t is None else None
    result = ProbeResult(
        "pixel_locality",
        metadata={
            **den.metadata(),
            "site": "output",
            "branch": branch,
            "quantity": quantity,
            "method": method,
            "seeds": seed_list if seed_list is not None else "x_t given",
            "n_samples": int(inputs[0][1].shape[0]),
            "levels": levels,
            "x0": "x_t given" if x_t is not None else ("given" if x0 is not None else "zeros"),
        },
    )
    maps, jacs = [], []
    px = None
    for level, xs, ts in inputs:
        px = pixel_list(pixels, tuple(xs.shape[-2:]))
        if method == "dense" and not keep_jacobian:
            G = None
            passes = 0
            for s, sl, rows in iter_jacobian_blocks(den, cond, x_t=xs, timestep=ts, pixels=px, branch=branch, quantity=quantity,
                                                    chunk_size=chunk_size, memory_budget=memory_budget):
                if G is None:
                    G = torch.zeros(px.shape[0], *rows.shape[-2:], dtype=rows.dtype, device=rows.device)
                G[sl] += rows.abs().sum(dim=(1, 2)) / xs.shape[0]
                passes += rows.shape[0] * rows.shape[1]
            jac = None
            certified = torch.ones(px.shape[0], dtype=torch.bool)
        elif method == "dense":
            jac = pixel_jacobian(den, cond, x_t=xs, timestep=ts, pixels=px, branch=branch, quantity=quantity,
                                 chunk_size=chunk_size, memory_budget=memory_budget)
            passes = jac.shape[0] * jac.shape[1] * jac.shape[2]
            certified = torch.ones(px.shape[0], dtype=torch.bool)
        else:
            from probes.compressed import compressed_jacobian

            cj = compressed_jacobian(den, cond, x_t=xs, timestep=ts, radius_px=radius_px, branch=branch, quantity=quantity,
                                     chunk_size=chunk_size, memory_budget=memory_budget)
            H, W = xs.shape[-2:]
            flat = px[:, 0] * W + px[:, 1]
            jac = cj.jacobian[:, flat]
            passes = cj.passes
            certified = cj.certified.all(0)[flat]
        if jac is not None:
            G = aggregate_map(jac)
        maps.append(G.float())
        if keep_jacobian:
            jacs.append(jac)
        summ = pixel_summaries(G, px, quantiles)
        for p in range(px.shape[0]):
            idx = {"t": level, "timestep": int(ts), "pixel_row": int(px[p, 0]), "pixel_col": int(px[p, 1])}
            for name, vals in summ.items():
                result.add(name, float(vals[p]), **idx)
        result.add("backward_passes", passes, t=level, timestep=int(ts))
        result.add("certified_fraction", float(certified.float().mean()), t=level, timestep=int(ts))
    result.maps["G"] = torch.stack(maps)
    result.axes["G"] = ("t", "pixel", "row", "col")
    result.maps["pixels"] = px
    result.axes["pixels"] = ("pixel", "row_col")
    if keep_jacobian:
        result.maps["jacobian"] = torch.stack(jacs)
        result.axes["jacobian"] = ("t", "sample", "pixel", "c_out", "c_in", "row", "col")
    return result
