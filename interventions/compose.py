"""Feature- and score-space composition: expand rows into ``[c, ∅, c_1 … c_k]`` and recombine at sites.

A selected row keeps its place in the batch; its ``k + 1`` auxiliary rows (``∅``, ``c_1`` … ``c_k``) are
*appended* after all original rows, so the call's branch slices (``[uncond; cond]``) stay valid for every
other hook (captures, patches) and the U-Net's forward hook returns rows ``[0, B)`` only. The spec's row
order ``[c, ∅, c_1 …]`` per row is the same computation laid out differently (*ours*: appending keeps
every announced slice true).

Soft masks (*ours*): ``soft > 0`` gives each disc a raised-cosine edge, 1 up to ``radius`` and 0 from
``radius + soft``; each pixel still belongs to its nearest conditioner only, so the masks stay disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from interp.conditioning import Conditioning, ConditioningBatch
from interp.masks import composition_masks
from interp.site import spatial_view


def soft_composition_masks(locations: Tensor, hw: tuple[int, int], radius: float, soft: float = 0.0) -> Tensor:
    """``(k, h, w)`` composition masks with an optional soft edge: :func:`interp.masks.composition_masks`."""
    return composition_masks(locations, hw, radius, soft)


@dataclass
class Expansion:
    """Auxiliary rows of one call: for original row ``r``, ``null[r]`` and ``singles[r]`` index the expanded batch."""

    batch: int
    parents: list[int] = field(default_factory=list)  # original row of each auxiliary row
    conditionings: list[Conditioning] = field(default_factory=list)  # conditioning of each auxiliary row
    null: dict[int, int] = field(default_factory=dict)
    singles: dict[int, list[int]] = field(default_factory=dict)
    locations: dict[int, Tensor] = field(default_factory=dict)
    # auxiliary row -> (original row, token positions): a single-conditioner row's tokens are those positions of
    # the original row's *own* tokens, so they stay traced (a JVP/VJP through the composition sees c_j).
    gathers: dict[int, tuple[int, Tensor]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.batch + len(self.parents)


def plan_expansion(batch: int, conditionings: tuple[Any, ...], rows: list[int]) -> Expansion:
    """Auxiliary rows for the selected original ``rows`` (rows with ``k = 0`` pass through)."""
    exp = Expansion(batch)
    for r in rows:
        c = conditionings[r]
        if not isinstance(c, Conditioning):
            raise ValueError(
                f"Compose: row {r} of this U-Net call has no announced Conditioning (got {type(c).__name__}); "
                "composition needs each row's conditioners: call the model through an interp.Denoiser with "
                "Conditioning objects (not a ConditioningBatch or a raw pipeline call)"
            )
        if c.k == 0:
            continue  # the null condition is its own composition
        if c.locations is None:
            raise ValueError(f"Compose: row {r}'s conditioning has {c.k} conditioners but no locations; composition "
                             "masks are discs around conditioner locations (pass a located conditioning)")
        exp.null[r] = batch + len(exp.parents)
        exp.parents.append(r)
        exp.conditionings.append(c.null())
        exp.singles[r] = []
        for j in range(c.k):
            row = batch + len(exp.parents)
            exp.singles[r].append(row)
            exp.parents.append(r)
            exp.conditionings.append(c.only(j))
            # only(j) keeps the context tokens and j's tokens in their order: these positions of row r
            exp.gathers[row] = (r, torch.nonzero((c.owner == -1) | (c.owner == j)).flatten())
        exp.locations[r] = c.locations
    return exp


_HANDLED = {"sample", "timestep", "encoder_hidden_states", "encoder_attention_mask", "added_cond_kwargs", "return_dict"}


def expand_inputs(args: tuple, kwargs: dict, exp: Expansion) -> tuple[tuple, dict]:
    """The U-Net's ``(args, kwargs)`` with the auxiliary rows appended (tokens padded, mask extended)."""
    names = ("sample", "timestep", "encoder_hidden_states")
    values = dict(zip(names, args))
    extra_args = args[3:]
    if extra_args:
        raise TypeError(f"Compose cannot expand {len(args)} positional U-Net arguments; pass the rest by keyword")
    kw = dict(kwargs)
    for n in names:
        if n in kw:
            values[n] = kw.pop(n)
    for key, value in kw.items():
        if key in _HANDLED or value is None or (isinstance(value, dict) and not value):
            continue
        raise TypeError(f"Compose cannot expand the U-Net argument {key!r} over its extra rows; call the model "
                        "through an interp.Denoiser without it")
    parents = torch.tensor(exp.parents, dtype=torch.long)
    x, ts, ehs = values["sample"], values["timestep"], values["encoder_hidden_states"]
    dev = x.device
    idx = parents.to(dev)
    x2 = torch.cat([x, x[idx]])
    ts_t = torch.as_tensor(ts)
    ts2 = ts if ts_t.dim() == 0 or ts_t.numel() == 1 else torch.cat([ts_t, ts_t.to(dev)[idx]])
    mask = kw.get("encoder_attention_mask")
    if mask is None:
        mask = torch.ones(ehs.shape[:2], dtype=torch.bool, device=ehs.device)
    elif mask.dtype != torch.bool:
        raise TypeError(f"Compose expects a boolean encoder_attention_mask (as the Denoiser passes), got {mask.dtype}")
    added = kw.get("added_cond_kwargs") or {}
    aux = ConditioningBatch.stack(exp.conditionings)
    if set(aux.added) != set(added):
        raise ValueError(f"the conditionings carry added inputs {sorted(aux.added)} but the call passed {sorted(added)}")
    orig = ConditioningBatch(tokens=ehs, mask=mask, added=dict(added))
    aux_tokens = aux.tokens.to(device=ehs.device, dtype=ehs.dtype)
    rows = []
    for a in range(aux_tokens.shape[0]):
        gather = exp.gathers.get(exp.batch + a)
        if gather is None:  # the null row: it does not depend on the row's conditioners
            rows.append(aux_tokens[a])
            continue
        r, positions = gather
        own = ehs[r, positions.to(ehs.device)]
        if own.shape != aux_tokens[a, : own.shape[0]].shape:
            raise ValueError(f"Compose: row {r}'s tokens do not match its announced Conditioning "
                             f"({tuple(own.shape)} vs {tuple(aux_tokens[a].shape)})")
        pad = aux_tokens[a, own.shape[0]:]
        rows.append(torch.cat([own, pad]))  # functional (no in-place write), so torch.func transforms see through it
    aux = ConditioningBatch(tokens=torch.stack(rows), mask=aux.mask.to(ehs.device),
                            added={k: v.to(device=added[k].device, dtype=added[k].dtype) for k, v in aux.added.items()})
    both = ConditioningBatch.concat([orig, aux])
    kw["encoder_attention_mask"] = both.mask
    if added:
        kw["added_cond_kwargs"] = both.added
    return (x2, ts2, both.tokens), kw


def compose_rows(act: Tensor, exp: Expansion, rows: list[int], radius: float, soft: float,
                 image_hw: tuple[int, int] | None, site: str) -> Tensor:
    """``act`` (expanded batch) with each original row in ``rows`` replaced by its masked composition.

    ``act`` is ``(B', C, h, w)`` or a token sequence ``(B', N, C)`` (viewed on the grid of the input's aspect).
    """
    tokens = act.dim() == 3
    if act.dim() not in (3, 4):
        raise ValueError(f"Compose at {site!r}: cannot compose an activation of shape {tuple(act.shape)}; "
                         "expected (B, C, h, w) or (B, N, C)")
    if act.shape[0] != exp.rows:
        raise ValueError(f"Compose at {site!r}: the activation has {act.shape[0]} rows but the expanded call has {exp.rows}")
    grid = spatial_view(act[:1], image_hw).shape[-2:] if tokens else act.shape[-2:]
    out = act.clone()
    for r in rows:
        if r not in exp.null:
            continue
        masks = soft_composition_masks(exp.locations[r], (int(grid[0]), int(grid[1])), radius, soft).to(act)
        if tokens:
            masks = masks.flatten(1)[..., None]  # (k, N, 1): row-major like the token order
        else:
            masks = masks[:, None]  # (k, 1, h, w)
        null = act[exp.null[r]]
        comp = null.clone()
        for j, s in enumerate(exp.singles[r]):
            comp = comp + masks[j] * (act[s] - null)
        out[r] = comp
    return out


__all__ = ["Expansion", "compose_rows", "expand_inputs", "plan_expansion", "soft_composition_masks"]
