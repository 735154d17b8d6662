"""Compressed Jacobian probing for local models: many output pixels per backward pass, verified by random VJPs.

**Colouring.** If every Jacobian row ``J_i = ∂D_i/∂x`` is supported in the ``(2R+1)²`` box around pixel
``i`` (Chebyshev radius ``R = radius_px``), output pixels spaced ``s = 2R + 1`` apart have disjoint supports,
and one VJP with the *sum* of their cotangents returns all their rows at once: the row of ``i`` is the result
restricted to ``i``'s box. Colouring the pixel grid by ``(row mod s, col mod s)`` covers every pixel with
``min(s, H)·min(s, W)`` passes per output channel instead of ``H·W`` (a colouring of the "supports overlap"
graph: Curtis–Powell–Reid compression of sparse Jacobians). This gives a *candidate* Jacobian ``J̃``; it is
exact only if the locality hypothesis holds, which is never assumed.

**Certificate** *(ours)*. Agreement between colourings proves nothing (a model whose outputs also read the
input at an offset that is a multiple of both spacings fools any pair of colourings), so ``J̃`` is checked
against the model itself: for a group ``g`` of output pixels we draw a Gaussian cotangent ``u`` supported on
``g``'s rows (all output channels of those pixels; seeded float64 draws, rounded to the output's dtype and then
used identically on both sides) and compare the true VJP ``uᵀJ`` (one backward pass through the same
linearisation) with ``uᵀJ̃`` (a matrix product, no pass). The group **passes** when

    max_j |(uᵀJ − uᵀJ̃)_j| ≤ τ,   τ = rtol · max(max_j (|u|ᵀ|J̃|)_j, max_j |(uᵀJ)_j|) + atol

for each of its ``checks`` cotangents. If the rows of ``g`` are exact, ``uᵀJ = uᵀJ̃`` up to rounding. If some
entry of ``J − J̃`` in column ``j`` is nonzero, ``(uᵀ(J − J̃))_j`` is a Gaussian with standard deviation
``e = ‖(J − J̃)_{g, j}‖₂ > 0``: in exact arithmetic (``τ = 0``) it vanishes with **probability 0**; in floating
point it falls below a tolerance ``τ`` with probability at most ``√(2/π)·τ/e ≈ 0.8·τ/e`` per cotangent, so at
most ``(0.8·τ/|δ|)^checks`` for a wrong entry of size ``|δ|`` (``τ`` read at its typical value: it grows with
``|u|`` as the error term does). Default ``rtol``, by the coarser of the network's and the output's dtype:
``1e-10`` float64, ``1e-4`` float32, ``5e-2`` fp16, ``2e-1`` bf16. The scale is the check's, not each entry's,
because rounding in a backward pass follows the magnitudes it sums (measured rounding of an exact check in
float32: 4.8e-7 of the scale on exp3, 5.5e-7 on exp1, 32×32: float32 keeps a 200× margin). Half precision
only certifies errors well above its rounding: to certify small entries, cast the model to float32 first.

**Localisation.** One check on all pixels at once; a group that fails is split into up to 8 contiguous
parts of the pixels in colour-major, then row-major order (a wrong row shares its colour sum with the rows it
contaminates, so errors cluster in few colour classes), each checked (one pass each; all parts of a level
are batched together). A failed single pixel, or the failed parts of a group where more than half of the
parts failed (a non-local model: splitting further would cost more than it saves), fall back to dense VJPs.
Worst case (every row wrong): ``colouring + 9 + dense + 1`` passes. After a fallback the assembled Jacobian
is re-verified by one more check on all pixels (the ``+ 1``).

**Guarantee.** A pixel is *certified* when a group containing it passed its check; its rows then equal the dense
rows with probability 1 in exact arithmetic, and otherwise differ in no entry by ``|δ|`` except with probability
``≤ (0.8·τ/|δ|)^checks`` (union over the passing groups). With ``fallback=True`` every uncertified pixel gets its
dense rows, so the returned Jacobian is the dense one everywhere (certified rows in the sense above, the others
by construction).

Memory: the result is the full Jacobian, ``H·W·C_out·C_in·H·W`` numbers per sample (38 MB at 3×32²,
1 GB at 4×64²): meant for the CLEVR scale; for larger latents probe a grid of pixels densely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from interp import Conditioning, Denoiser
from interp.compat import renamed_kwargs
from interp.evaluate import Branch, Quantity, accumulation_dtype, evaluate
from interp.inputs import resolve_timestep
from probes.jacobian import RowEngine, basis_cotangents, derivative_context

_SPLIT = 8  # parts per failed group: log_8 localisation depth, at most 9 wasted checks when everything is wrong
# ~200x the measured rounding of an exact check (float32: 5e-7 of the scale on the shipped CLEVR models)
_DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}


@dataclass
class CompressedJacobian:
    """The full Jacobian of every output pixel, with how it was obtained and how it was verified.

    Attributes:
        jacobian: ``(S, H·W, C_out, C_in, H, W)``, pixel-major (``row * W + col``), in the accumulation dtype.
        certified: ``(S, H·W)`` bool: the colouring estimate of this pixel's rows passed a random-projection
            check (see the module docstring: a wrong entry passes with probability 0 for Gaussian cotangents
            in exact arithmetic, with probability ``≤ (0.8·τ/|δ|)^checks`` in floating point). Uncertified
            pixels hold dense rows when ``fallback=True`` (exact by construction), else the colouring estimate.
        passes: backward passes used in total (colouring + checks + fallback), summed over samples.
        check_passes: the part of ``passes`` spent on the certificate (random-projection checks, re-verification).
        dense_passes: what the dense Jacobian costs (``S · H·W · C_out``).
        radius_px: the hypothesised support radius (pixels, Chebyshev).
    """

    jacobian: Tensor
    certified: Tensor
    passes: int
    check_passes: int
    dense_passes: int
    radius_px: int

    @property
    def fallback_rows(self) -> int:
        """Number of uncertified output pixels (over all samples)."""
        return int((~self.certified).sum())


def _colours(spacing: int, H: int, W: int, device: Any) -> tuple[Tensor, int]:
    """``(H, W)`` colour index of each pixel and the number of colours ``min(s, H)·min(s, W)``.

    Colours that no pixel has (spacing wider than the image) are not numbered, so no pass is wasted on them."""
    ncol = min(spacing, W)
    rr = torch.arange(H, device=device) % spacing
    cc = torch.arange(W, device=device) % spacing
    return rr[:, None] * ncol + cc[None, :], min(spacing, H) * ncol


def colouring_cotangents(spacing: int, shape: tuple[int, int, int], *, dtype: torch.dtype, device: Any) -> Tensor:
    """``(K·C, C, H, W)`` cotangents, ``K = min(s, H)·min(s, W)``: colour ``k`` and channel ``c`` select every
    pixel with ``(row mod s, col mod s)`` of colour ``k`` in channel ``c`` (colour-major, channel-minor)."""
    C, H, W = shape
    colour, K = _colours(spacing, H, W, device)
    onehot = (colour[None] == torch.arange(K, device=device)[:, None, None]).to(dtype)  # (K, H, W)
    eye = torch.eye(C, dtype=dtype, device=device)
    return (onehot[:, None, None] * eye[None, :, :, None, None]).reshape(K * C, C, H, W)


def _recover(sums: Tensor, spacing: int, H: int, W: int, C_out: int) -> Tensor:
    """Candidate rows ``(H·W, C_out, C_in, H, W)`` from colour sums ``(K·C_out, C_in, H, W)``: each pixel's
    colour sum restricted to its ``spacing × spacing`` box (separable row / column masks, no ``(HW)²`` index)."""
    R = (spacing - 1) // 2
    dev = sums.device
    colour, K = _colours(spacing, H, W, dev)
    per_colour = sums.reshape(K, C_out, *sums.shape[1:])
    r = torch.arange(H, device=dev)
    c = torch.arange(W, device=dev)
    rmask = ((r[:, None] - r[None, :]).abs() <= R).to(sums.dtype)  # (H_pixel, H)
    cmask = ((c[:, None] - c[None, :]).abs() <= R).to(sums.dtype)  # (W_pixel, W)
    window = (rmask[:, None, :, None] * cmask[None, :, None, :]).reshape(H * W, H, W)
    return per_colour[colour.flatten()] * window[:, None, None]


class _Verifier:
    """Random-projection checks of a candidate Jacobian against the model's own VJPs (see the module docstring)."""

    def __init__(self, eng: RowEngine, jt: Tensor, order: Tensor, gen: torch.Generator, *, checks: int, rtol: float,
                 atol: float) -> None:
        self.eng, self.jt, self.order, self.gen = eng, jt, order, gen
        self.checks, self.rtol, self.atol = checks, rtol, atol
        self.passes = 0

    def __call__(self, groups: list[tuple[int, int]]) -> list[bool]:
        """Whether each group — pixels ``order[a:b]`` — passes ``checks`` Gaussian checks (one batched pull for all)."""
        C_out, H, W = self.eng.out.shape[1:]
        acc, k = self.jt.dtype, self.checks
        u = torch.zeros(len(groups) * k, H * W, C_out, dtype=torch.float64)
        for gi, (a, b) in enumerate(groups):
            # float64 draws on the CPU generator: the same numbers for a seed on every device and dtype
            u[gi * k : (gi + 1) * k, self.order[a:b]] = torch.randn(k, b - a, C_out, generator=self.gen, dtype=torch.float64)
        # round to the model dtype first, so both sides of the comparison use the very same cotangent
        u = u.to(device=self.jt.device, dtype=self.eng.out.dtype).to(acc)
        true = self.eng(u.reshape(-1, H, W, C_out).permute(0, 3, 1, 2)).to(acc).flatten(1)  # (G·k, D)
        self.passes += u.shape[0]
        ok = []
        for gi, (a, b) in enumerate(groups):
            idx = self.order[a:b].to(self.jt.device)
            ug = u[gi * k : (gi + 1) * k, idx]  # (k, n, C_out)
            jg = self.jt[idx].flatten(2)  # (n, C_out, D)
            pred = torch.einsum("knc,ncd->kd", ug, jg)
            tg = true[gi * k : (gi + 1) * k]
            scale = torch.maximum(torch.einsum("knc,ncd->kd", ug.abs(), jg.abs()).amax(1), tg.abs().amax(1))
            ok.append(bool(((tg - pred).abs().amax(1) <= self.rtol * scale + self.atol).all()))
        return ok


def _split(a: int, b: int, parts: int) -> list[tuple[int, int]]:
    """``[a, b)`` cut into ``min(parts, b − a)`` contiguous, nearly equal ranges."""
    n = min(parts, b - a)
    edges = [a + (b - a) * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _localise(verify: _Verifier, P: int) -> Tensor:
    """``(P,)`` bool, in check order: positions inside a group that passed its check (adaptive group testing)."""
    certified = torch.zeros(P, dtype=torch.bool)
    families: list[list[tuple[int, int]]] = [[(0, P)]]  # sibling groups, checked together
    while families:
        flat = [g for fam in families for g in fam]
        ok = iter(verify(flat))
        next_families = []
        for fam in families:
            failed = []
            for a, b in fam:
                if next(ok):
                    certified[a:b] = True
                else:
                    failed.append((a, b))
            if len(fam) > 1 and 2 * len(failed) > len(fam):
                continue  # mostly wrong: splitting further costs more than the dense rows it could save
            next_families += [_split(a, b, _SPLIT) for a, b in failed if b - a > 1]
        families = next_families
    return certified


@renamed_kwargs(output="quantity", radius="radius_px")
def compressed_jacobian(
    den: Denoiser,
    cond: Conditioning,
    *,
    x_t: Tensor,
    t: float | None = None,
    timestep: Tensor | float | int | None = None,
    radius_px: int | None = None,
    branch: Branch = "cond",
    quantity: Quantity = "prediction",
    seed: int = 0,
    checks: int = 1,
    rtol: float | None = None,
    atol: float = 0.0,
    fallback: bool = True,
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    derivative_ready: bool | None = None,
) -> CompressedJacobian:
    """All Jacobian rows by coloured probing, verified by random VJPs, dense where the check fails.

    Args:
        den: the denoiser.
        cond: the conditioning (broadcast over samples).
        x_t: ``(S, C, H, W)`` inputs; each sample is linearised separately. The output must have the same ``H, W``.
        t / timestep: the noise level of ``x_t``, exactly one: noise fraction ``t ∈ [0, 1]`` or the raw training
            ``timestep`` (see :func:`interp.inputs.resolve_timestep`).
        radius_px: hypothesised support radius ``R`` (pixels, Chebyshev); the colouring spacing is ``2R + 1``.
        branch / quantity: which function is differentiated (as in :func:`probes.jacobian.pixel_jacobian`).
        seed: seed of the Gaussian check cotangents (results are deterministic given the seed).
        checks: independent Gaussian cotangents per checked group (each costs one pass per group; more checks
            shrink the floating-point escape probability ``(0.8·τ/|δ|)^checks``).
        rtol / atol: check tolerance ``τ = rtol · scale + atol`` (module docstring); ``rtol=None`` picks it from
            the model dtype (1e-10 float64, 1e-4 float32, 5e-2 fp16, 2e-1 bf16).
        fallback: recompute uncertified pixels densely (``False`` leaves the colouring estimate there).
        chunk_size / memory_budget: VJP batching (see :class:`probes.jacobian.RowEngine`).
        derivative_ready: differentiate inside :func:`interp.forward_mode.forward_mode_ready` (math SDPA);
            ``None``: by the model's device, as in :func:`probes.pixel_jacobian`.

    ``radius=`` and ``output=`` are the deprecated names of ``radius_px=`` and ``quantity=``.

    Returns:
        :class:`CompressedJacobian` with ``jacobian (S, H·W, C_out, C_in, H, W)`` and ``certified (S, H·W)``.
    """
    if radius_px is None:
        raise TypeError("compressed_jacobian needs radius_px= (the hypothesised receptive-field radius in pixels)")
    if isinstance(radius_px, bool) or not isinstance(radius_px, int):
        raise TypeError(f"radius_px must be an int number of pixels, got {type(radius_px).__name__}")
    if radius_px < 0:
        raise ValueError(f"radius_px must be >= 0 pixels, got {radius_px}")
    if not isinstance(den, Denoiser):
        raise TypeError(f"den must be an interp.Denoiser, got {type(den).__name__}")
    if isinstance(cond, Tensor):
        raise TypeError("cond must be a Conditioning, got a Tensor; the signature is "
                        "compressed_jacobian(den, cond, *, x_t=..., t=... or timestep=..., radius_px=...)")
    if not isinstance(x_t, Tensor) or x_t.dim() != 4:
        raise ValueError(f"x_t must be a (S, C, H, W) tensor, got {tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__}")
    if isinstance(checks, bool) or not isinstance(checks, int) or checks < 1:
        raise ValueError(f"checks must be an int >= 1 (Gaussian cotangents per checked group), got {checks!r}")
    if rtol is not None and not rtol >= 0:
        raise ValueError(f"rtol must be >= 0 (or None for the dtype default), got {rtol!r}")
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol!r}")
    ts = resolve_timestep(den, t=t, timestep=timestep)
    S, _, H, W = x_t.shape
    acc = accumulation_dtype(x_t)
    gen = torch.Generator().manual_seed(int(seed))
    spacing = 2 * radius_px + 1
    rows, certs, passes, check_passes, dense = [], [], 0, 0, 0
    with derivative_context(den, derivative_ready):
        for s in range(S):
            fn = lambda x: evaluate(den, x, ts, cond, branch=branch, quantity=quantity)  # noqa: E731
            eng = RowEngine(fn, x_t[s : s + 1], chunk_size=chunk_size, memory_budget=memory_budget, freeze=(den.unet,))
            if tuple(eng.out.shape[-2:]) != (H, W):
                raise ValueError(f"compressed probing needs an output on the input's pixel grid {(H, W)}, "
                                 f"got {tuple(eng.out.shape[-2:])}; use probes.pixel_jacobian")
            shape = tuple(eng.out.shape[1:])
            C_out = shape[0]
            # the coarser of the network's own dtype and the output's: a bf16 network behind a float32 output
            # (the Denoiser casts back) rounds like bf16
            tol = max(_DEFAULT_RTOL.get(d, 1e-4) for d in (den.dtype, eng.out.dtype)) if rtol is None else float(rtol)
            sums = eng(colouring_cotangents(spacing, shape, dtype=eng.out.dtype, device=x_t.device)).to(acc)
            jac = _recover(sums, spacing, H, W, C_out)  # (HW, C_out, C_in, H, W)
            # Check order: colour-major, then row-major. A row the colouring gets wrong shares its colour sum with
            # the rows it contaminates, so errors cluster in few colour classes and the first splits isolate them.
            colour, _ = _colours(spacing, H, W, "cpu")
            order = torch.argsort(colour.flatten() * (H * W) + torch.arange(H * W))
            verify = _Verifier(eng, jac, order, gen, checks=checks, rtol=tol, atol=atol)
            cert = torch.zeros(H * W, dtype=torch.bool)
            cert[order] = _localise(verify, H * W)
            if fallback and not bool(cert.all()):
                failed = torch.nonzero(~cert).flatten()
                px = torch.stack([failed // W, failed % W], 1)
                dense_rows = eng(basis_cotangents(px, shape, dtype=eng.out.dtype, device=x_t.device)).to(acc)
                jac[failed.to(jac.device)] = dense_rows.reshape(failed.shape[0], C_out, *dense_rows.shape[1:])
                # Re-verify the assembled matrix: dense rows are exact by construction, so a failure here is an
                # indexing bug or a tolerance too tight for this model's rounding, never a property of the model.
                if not verify([(0, H * W)])[0]:
                    raise RuntimeError(
                        "the assembled compressed Jacobian failed its final random-projection check although every "
                        f"uncertified pixel was recomputed densely; raise rtol (now {tol:g}) if this model's backward "
                        "pass rounds more than that, else report this as a bug"
                    )
            rows.append(jac)
            certs.append(cert)
            passes += eng.passes
            check_passes += verify.passes
            dense += H * W * C_out
    return CompressedJacobian(torch.stack(rows), torch.stack(certs), passes, check_passes, dense, radius_px)
