"""Hand-written reference implementations the probes are timed against (bench/bench_probes.py ``--only speed``).

Each is what a skilled user would write directly with ``torch.func`` / ``torch.autograd`` for the same numbers,
with every shortcut the probes take (frozen parameters, the same chunking) and none of the probes' checks,
bookkeeping or memory budget. They share nothing with the probes' code paths, so a speed-up of the probes
cannot come from a slower reference.

* :func:`rows_vjp_vmap` — Jacobian rows: ``torch.func.vjp`` once, ``vmap`` of the pullback over chunks of
  one-hot cotangents, parameters frozen.
* :func:`rows_jacrev` — all rows by ``torch.func.jacrev(chunk_size=...)``, parameters frozen.
* :func:`rows_loop` / :func:`one_vjp_seconds` — a per-row ``autograd.grad`` loop and the time of one VJP (the
  floor: rows × one VJP).
* :func:`jvp_forward` — directional derivatives in the tokens by ``torch.func.jvp`` (batched tangents).
* :func:`jvp_reverse` — the same by the double-backward trick (one ``create_graph`` backward, then one
  ``torch.func.vmap``-batched backward per chunk of directions).
* :func:`ablation_forwards` — ``‖D(c) − D(c∖j)‖`` maps from ``k + 1`` plain forwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _fn(den, ts, cond):
    from interp.evaluate import evaluate

    return lambda v: evaluate(den, v, ts, cond)


def one_hot_rows(pixels: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """``(P·C, 1, C, H, W)`` one-hot cotangents, pixel-major (row ``p·C + c`` selects ``(c, pixels[p])``)."""
    C, H, W = shape
    cot = torch.zeros(pixels.shape[0] * C, 1, C, H, W)
    for p, (r, c) in enumerate(pixels.tolist()):
        for ch in range(C):
            cot[p * C + ch, 0, ch, r, c] = 1
    return cot


def rows_vjp_vmap(den, x: Tensor, ts, cond, cot: Tensor, chunk: int = 32) -> Tensor:
    """``(N, C, H, W)`` rows for cotangents ``(N, 1, C, H, W)`` at ``x (1, C, H, W)``."""
    with frozen(den.unet):
        _, pull = torch.func.vjp(_fn(den, ts, cond), x)
        return torch.cat([torch.func.vmap(pull)(cot[s : s + chunk])[0].squeeze(1) for s in range(0, cot.shape[0], chunk)])


def rows_jacrev(den, x: Tensor, ts, cond, chunk: int = 32) -> Tensor:
    """The whole Jacobian ``(C·H·W, C, H, W)`` by ``torch.func.jacrev``."""
    with frozen(den.unet):
        jac = torch.func.jacrev(_fn(den, ts, cond), chunk_size=chunk)(x)
    return jac.reshape(x[0].numel(), *x.shape[1:])


def rows_loop(den, x: Tensor, ts, cond, flat_rows: Tensor) -> list[Tensor]:
    """Rows ``flat_rows`` (flat output indices) by one ``autograd.grad`` each."""
    with frozen(den.unet):
        xx = x.detach().requires_grad_(True)
        out = _fn(den, ts, cond)(xx).flatten()
        return [torch.autograd.grad(out[int(i)], xx, retain_graph=True)[0] for i in flat_rows]


def one_vjp_seconds(den, x: Tensor, ts, cond, repeats: int) -> float:
    """Median seconds of one VJP (one-hot cotangent) through a graph built once."""
    import statistics

    with frozen(den.unet):
        xx = x.detach().requires_grad_(True)
        out = _fn(den, ts, cond)(xx)
        times = []
        for r in range(repeats):
            cot = torch.zeros_like(out)
            cot.view(-1)[(r * 97) % cot.numel()] = 1
            t0 = time.perf_counter()
            torch.autograd.grad(out, xx, cot, retain_graph=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _token_fn(den, x, ts, cond, n):
    from interp import ConditioningBatch
    from interp.evaluate import evaluate

    base = ConditioningBatch.stack([cond]).repeat(n)
    xs = x.expand(n, *x.shape[1:]).contiguous()
    return lambda tok: evaluate(den, xs, ts, base.with_tokens(tok))


def jvp_forward(den, x: Tensor, ts, cond, V: Tensor, chunk: int = 8) -> Tensor:
    """``(N, C, H, W)`` = ``(∂D/∂tokens)·v`` for ``V (N, L, D)`` by ``torch.func.jvp``, ``chunk`` tangents per pass."""
    from interp.forward_mode import forward_mode_ready

    outs = []
    with frozen(den.unet), forward_mode_ready(den.unet):
        for s in range(0, V.shape[0], chunk):
            v = V[s : s + chunk]
            primal = cond.tokens.unsqueeze(0).expand(v.shape[0], -1, -1).clone()
            outs.append(torch.func.jvp(_token_fn(den, x, ts, cond, v.shape[0]), (primal,), (v,))[1])
    return torch.cat(outs)


def jvp_reverse(den, x: Tensor, ts, cond, V: Tensor, chunk: int = 8) -> Tensor:
    """The same by reverse mode: ``g = uᵀJ`` with ``create_graph``, then ``Jv = ∂⟨g, v⟩/∂u`` batched."""
    from interp.forward_mode import forward_mode_ready

    with frozen(den.unet), forward_mode_ready(den.unet), torch.enable_grad():
        tok = cond.tokens[None].clone().requires_grad_(True)
        out = _token_fn(den, x, ts, cond, 1)(tok)
        u = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, tok, u, create_graph=True)
        pull = torch.func.vmap(lambda v: torch.autograd.grad(g, u, v, retain_graph=True)[0])
        return torch.cat([pull(V[s : s + chunk].unsqueeze(1)).squeeze(1) for s in range(0, V.shape[0], chunk)])


def ablation_forwards(den, x: Tensor, ts, cond) -> Tensor:
    """``(k, H, W)`` maps ``‖D(x|c) − D(x|c∖j)‖`` over channels, mean over samples, from ``k + 1`` forwards."""
    from interp.evaluate import evaluate

    with torch.no_grad():
        full = evaluate(den, x, ts, cond)
        return torch.stack([(full - evaluate(den, x, ts, cond.drop(j))).pow(2).sum(1).sqrt().mean(0) for j in range(cond.k)])
