"""Compressed Jacobian probing for local models: many output pixels per backward pass, certified.

If every Jacobian row ``J_i = ∂D_i/∂x`` is supported in the ``(2R+1)²`` box around pixel ``i``, then
output pixels spaced ``s = 2R + 1`` apart have disjoint supports, and one VJP with the *sum* of their
cotangents returns all their rows at once: the row of ``i`` is the result restricted to ``i``'s box.
Colouring the pixel grid by ``(row mod s, col mod s)`` covers every pixel with ``s²`` passes per output
channel instead of ``H·W`` (a graph colouring of the "supports overlap" graph; Curtis–Powell–Reid
compression of sparse Jacobians).

**Certificate** *(ours)*. The hypothesis "support within radius R" is checked, not assumed: a second
colouring with spacing ``s' = 2R + 3`` (a different grouping of pixels, and windows one pixel wider)
gives a second estimate of each row. A row is certified when (a) the second estimate vanishes on the ring
between radius R and R+1 and (b) both estimates agree inside radius R, to a tolerance relative to the
largest compressed entry. A row whose true support leaves its box contaminates, or is truncated in, the
two colourings differently, so (a) or (b) fails — exactly so when supports are *connected* around the
pixel (convolutional receptive fields are boxes), and generically otherwise. Uncertified rows fall back
to dense VJPs, so the returned Jacobian equals the dense one wherever it is certified and everywhere else
by construction.

Memory: the result is the full Jacobian, ``H·W·C_out·C_in·H·W`` numbers per sample (38 MB at 3×32²,
1 GB at 4×64²): meant for the CLEVR scale; for larger latents probe a grid of pixels densely.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from interp import Conditioning, Denoiser
from interp.forward_mode import forward_mode_ready
from interp.evaluate import Branch, Output, accumulation_dtype, evaluate
from probes.jacobian import RowEngine, basis_cotangents


@dataclass
class CompressedJacobian:
    """The full Jacobian of every output pixel, with how it was obtained.

    Attributes:
        jacobian: ``(S, H·W, C_out, C_in, H, W)``, pixel-major (``row * W + col``).
        certified: ``(S, H·W)`` bool, rows certified by the two colourings.
        passes: backward passes used (colourings + fallback), summed over samples.
        dense_passes: what the dense Jacobian costs (``S · H·W · C_out``).
        radius: the hypothesised support radius.
    """

    jacobian: Tensor
    certified: Tensor
    passes: int
    dense_passes: int
    radius: int

    @property
    def fallback_rows(self) -> int:
        return int((~self.certified).sum())


def colouring_cotangents(spacing: int, shape: tuple[int, int, int], *, dtype: torch.dtype, device: Any) -> Tensor:
    """``(s²·C, C, H, W)`` cotangents: colour ``(a, b)`` and channel ``c`` select every pixel with
    ``row ≡ a``, ``col ≡ b (mod s)`` in channel ``c`` (colour-major, channel-minor)."""
    C, H, W = shape
    rr = torch.arange(H, device=device) % spacing
    cc = torch.arange(W, device=device) % spacing
    colour = (rr[:, None] * spacing + cc[None, :])  # (H, W)
    onehot = (colour[None] == torch.arange(spacing * spacing, device=device)[:, None, None]).to(dtype)  # (s², H, W)
    eye = torch.eye(C, dtype=dtype, device=device)
    return (onehot[:, None, None] * eye[None, :, :, None, None]).reshape(spacing * spacing * C, C, H, W)


def _chebyshev(H: int, W: int, device: Any) -> Tensor:
    """``(H·W, H, W)`` Chebyshev distance from each pixel (pixel-major) to every pixel."""
    r = torch.arange(H, device=device)
    c = torch.arange(W, device=device)
    dr = (r[:, None, None, None] - r[None, None, :, None]).abs()  # (H,1,H,1)
    dc = (c[None, :, None, None] - c[None, None, None, :]).abs()  # (1,W,1,W)
    return torch.maximum(dr, dc).reshape(H * W, H, W)


def _recover(sums: Tensor, spacing: int, dist: Tensor, C_out: int) -> Tensor:
    """Rows from colour sums ``(s²·C_out, C_in, H, W)``: each pixel's colour sum inside its box."""
    HW, H, W = dist.shape
    s = spacing
    rr = torch.arange(H, device=sums.device) % s
    cc = torch.arange(W, device=sums.device) % s
    colour = (rr[:, None] * s + cc[None, :]).flatten()  # (HW,)
    per_colour = sums.reshape(s * s, C_out, *sums.shape[1:])
    window = (dist <= (s - 1) // 2).to(sums.dtype)  # (HW, H, W)
    return per_colour[colour] * window[:, None, None]


def compressed_jacobian(
    den: Denoiser,
    x_t: Tensor,
    t: Tensor | int,
    cond: Conditioning,
    *,
    radius: int,
    branch: Branch = "cond",
    output: Output = "prediction",
    rtol: float = 1e-5,
    atol: float = 0.0,
    fallback: bool = True,
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    derivative_ready: bool = False,
) -> CompressedJacobian:
    """All Jacobian rows by coloured probing, certified by a second colouring, dense where not certified.

    Args:
        den, x_t ``(S, C, H, W)``, t, cond, branch, output: as in :func:`probes.jacobian.pixel_jacobian`.
        radius: hypothesised support radius ``R`` (pixels, Chebyshev); spacing ``2R+1`` and ``2R+3``.
        rtol / atol: certificate tolerance, relative to the largest compressed entry of the sample.
        fallback: recompute uncertified rows densely (``False`` leaves the colouring estimate there).
        chunk_size / memory_budget: VJP batching.
        derivative_ready: swap in the plain attention processor while differentiating (restored after).

    Returns:
        :class:`CompressedJacobian`.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0 pixels, got {radius}")
    S, _, H, W = x_t.shape
    if 2 * radius + 3 > max(H, W) * 2:
        raise ValueError(f"radius {radius} is too large for a {H}x{W} image; use the dense Jacobian")
    acc = accumulation_dtype(x_t)
    rows, certs, passes, dense = [], [], 0, 0
    with forward_mode_ready(den.unet) if derivative_ready else contextlib.nullcontext():
        for s in range(S):
            fn = lambda x: evaluate(den, x, t, cond, branch=branch, output=output)  # noqa: E731
            eng = RowEngine(fn, x_t[s : s + 1], chunk_size=chunk_size, memory_budget=memory_budget)
            C_out = eng.out.shape[1]
            shape = tuple(eng.out.shape[1:])
            dist = _chebyshev(H, W, x_t.device)
            sA, sB = 2 * radius + 1, 2 * radius + 3
            yA = eng(colouring_cotangents(sA, shape, dtype=eng.out.dtype, device=x_t.device)).to(acc)
            yB = eng(colouring_cotangents(sB, shape, dtype=eng.out.dtype, device=x_t.device)).to(acc)
            jA = _recover(yA, sA, dist, C_out)  # (HW, C_out, C_in, H, W)
            jB = _recover(yB, sB, dist, C_out)
            scale = torch.maximum(yA.abs().max(), yB.abs().max())
            tol = rtol * scale + atol
            inner = (dist <= radius)[:, None, None]
            ring_bad = ((jB * ~inner).abs().flatten(1).amax(1)) > tol
            agree_bad = (((jB - jA) * inner).abs().flatten(1).amax(1)) > tol
            cert = ~(ring_bad | agree_bad)
            jac = jA
            if fallback and (~cert).any():
                failed = torch.nonzero(~cert).flatten()
                px = torch.stack([failed // W, failed % W], 1)
                dense_rows = eng(basis_cotangents(px, shape, dtype=eng.out.dtype, device=x_t.device)).to(acc)
                jac = jac.clone()
                jac[failed] = dense_rows.reshape(failed.shape[0], C_out, *dense_rows.shape[1:])
            rows.append(jac)
            certs.append(cert.cpu())
            passes += eng.passes
            dense += H * W * C_out
    return CompressedJacobian(torch.stack(rows), torch.stack(certs), passes, dense, radius)
