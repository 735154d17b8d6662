"""Baseline attribution: captum's integrated gradients over the conditioner tokens.

Integrated gradients (Sundararajan et al. 2017) attributes one scalar output to the inputs by integrating
the gradient along the straight path from a baseline ``b`` to the input ``c``:
``IG(c) = (c − b) ⊙ ∫₀¹ ∇f(b + α(c − b)) dα``. Summing the attribution over conditioner ``j``'s token
coordinates gives ``j``'s share of output element ``(c_out, i)``. Every output element is a separate
target, so a full map costs ``C·H·W × n_steps`` gradient evaluations — the reason the JVP maps of
:mod:`probes.conditional` exist. For a model linear in the tokens, IG equals the JVP attribution
``(∂D/∂c_j)·(c_j − b_j)`` exactly; elsewhere they differ by the curvature along the path.

The result has the same format as ``conditional_locality(..., maps=("attribution",))``: map
``"attribution" (T, k, C, H, W)`` plus a ``"probed" (H, W)`` mask of the output pixels computed (the map is
zero elsewhere). Since the Denoiser takes the tokens directly, IG over ``encoder_hidden_states`` *is*
captum's ``LayerIntegratedGradients`` over the conditioner encoder's output layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from interp import Conditioning, ConditioningBatch, Denoiser
from interp.inputs import PixelSpec, as_levels, as_seeds, check_conditioning, forward_samples, pixel_list
from interp.compat import renamed_kwargs
from interp.evaluate import Quantity, accumulation_dtype, evaluate
from interp.results import ProbeResult
from probes.summaries import region_fractions


@renamed_kwargs(output="quantity")
def integrated_gradients_map(
    den: Denoiser,
    cond: Conditioning,
    t: float | Sequence[float],
    seeds: int | Sequence[int] = 1,
    *,
    pixels: PixelSpec = "all",
    n_steps: int = 50,
    method: str = "gausslegendre",
    baseline: Tensor | None = None,
    x0: Tensor | None = None,
    shape: Sequence[int] | None = None,
    quantity: Quantity = "prediction",
    radius: float | None = 0.2,
    internal_batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> ProbeResult:
    """Integrated-gradients attribution of each output element to each conditioner.

    Args:
        den, cond, t, seeds, x0, shape, dtype, quantity: as in :func:`probes.conditional.conditional_locality`.
        pixels: output pixels to attribute (each costs ``C × n_steps`` gradient evaluations).
        n_steps / method: captum's integration steps and rule.
        baseline: ``(L, D)`` baseline tokens (default zeros).
        radius: region radius for the summaries (when every pixel is probed and locations are known).
        internal_batch_size: rows per forward pass inside captum.

    Returns:
        :class:`ProbeResult` with maps ``"attribution" (T, k, C, H, W)``, ``"probed" (H, W)``, ``"delta" (T,)``
        (mean absolute convergence delta), and rows ``in_region`` etc. like the JVP probe.
    """
    from captum.attr import IntegratedGradients

    check_conditioning(cond)
    levels, seed_list = as_levels(t), as_seeds(seeds)
    cond = cond.to(den.device)
    base = baseline.to(cond.tokens) if baseline is not None else torch.zeros_like(cond.tokens)
    if base.shape != cond.tokens.shape:
        raise ValueError(f"baseline must be {tuple(cond.tokens.shape)} like cond.tokens, got {tuple(base.shape)}")
    result = ProbeResult(
        "integrated_gradients",
        metadata={**den.metadata(), "site": "output", "n_steps": n_steps, "method": method, "quantity": quantity,
                  "seeds": seed_list, "n_samples": len(seed_list), "k": cond.k, "levels": levels},
    )
    owner = cond.owner.to(den.device)
    maps, deltas = [], []
    probed = None
    for level in levels:
        x_t, ts = forward_samples(den, level, seed_list, x0=x0, shape=shape, dtype=dtype)
        acc = accumulation_dtype(x_t)
        C, H, W = x_t.shape[1:]
        px = pixel_list(pixels, (H, W))
        probed = torch.zeros(H, W, dtype=torch.bool)
        probed[px[:, 0], px[:, 1]] = True
        targets = [(c * H + int(r)) * W + int(col) for r, col in px.tolist() for c in range(C)]
        att = torch.zeros(len(seed_list), cond.k, C, H, W, dtype=acc)
        dsum = 0.0
        for s in range(x_t.shape[0]):
            x = x_t[s : s + 1]
            one = ConditioningBatch.stack([cond])

            def forward(tokens: Tensor) -> Tensor:
                n = tokens.shape[0]
                cb = ConditioningBatch(tokens=tokens, mask=one.mask.expand(n, -1),
                                       added={k: v.expand(n, *v.shape[1:]) for k, v in one.added.items()},
                                       rows=one.rows * n)
                return evaluate(den, x.expand(n, *x.shape[1:]), ts, cb, branch="cond", quantity=quantity).flatten(1)

            ig = IntegratedGradients(forward)
            M = len(targets)
            inputs = cond.tokens.unsqueeze(0).expand(M, -1, -1).contiguous()
            a, delta = ig.attribute(
                inputs, baselines=base.unsqueeze(0).expand(M, -1, -1).contiguous(), target=targets, n_steps=n_steps,
                method=method, internal_batch_size=internal_batch_size, return_convergence_delta=True,
            )
            dsum += float(delta.abs().mean())
            per_cond = torch.stack([a[:, owner == j].sum((1, 2)) for j in range(cond.k)], 1).detach().to("cpu", acc)  # (M, k)
            for m, tgt in enumerate(targets):
                c, rem = divmod(tgt, H * W)
                att[s, :, c, rem // W, rem % W] = per_cond[m]
        maps.append(att.mean(0))
        deltas.append(dsum / len(seed_list))
        result.add("convergence_delta", deltas[-1], t=level, timestep=int(ts))
        if radius is not None and cond.locations is not None and bool(probed.all()):
            fr = region_fractions(maps[-1].abs().sum(1), cond.locations, radius)
            for name, vals in fr.items():
                for j in range(cond.k):
                    result.add(name, float(vals[j]), t=level, timestep=int(ts), conditioner=j, label=cond.labels[j], map_name="ig")
    result.maps["attribution"] = torch.stack(maps).float()
    result.axes["attribution"] = ("t", "conditioner", "c_out", "row", "col")
    result.maps["probed"] = probed
    result.axes["probed"] = ("row", "col")
    result.maps["delta"] = torch.tensor(deltas)
    result.axes["delta"] = ("t",)
    return result
