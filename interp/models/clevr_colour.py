"""Colour-conditioned CLEVR: each conditioner is one object's location *and* colour.

For the feature-space work (SCIENCE.md §1, "feature-space version"): the concept "a red object here" is a
token that adds a learned colour embedding to the location token of
:class:`~interp.models.clevr.LocationEncoder`. The mean-feature differences ``d_i = μ_i − μ_b`` of the
colour concepts are then measurable at any layer, and their cosine matrix tests which colours compose
(the predecessor's finding: yellow + blue composes, yellow + red does not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from interp.conditioning import Conditioning
from interp.models.clevr import LocationEncoder, validate_locations

#: CLEVR's 8 colours: the colour vocabulary of :class:`ColourLocationEncoder` (index = token colour id). The
#: renderer (:mod:`interp.clevr.render`) draws them in this order.
COLOUR_NAMES: tuple[str, ...] = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")


def colour_indices(colours: Sequence[str | int] | Tensor) -> Tensor:
    """Colour names or indices → ``(k,)`` int64 indices into :data:`COLOUR_NAMES`."""
    out = []
    for c in (colours.tolist() if isinstance(colours, Tensor) else colours):
        if isinstance(c, str):
            if c not in COLOUR_NAMES:
                raise ValueError(f"unknown colour {c!r}; choose one of {list(COLOUR_NAMES)}")
            out.append(COLOUR_NAMES.index(c))
        else:
            if not 0 <= int(c) < len(COLOUR_NAMES):
                raise ValueError(f"colour index {c} out of range [0, {len(COLOUR_NAMES)})")
            out.append(int(c))
    return torch.tensor(out, dtype=torch.long)


class ColourLocationEncoder(LocationEncoder):
    """Location + colour → one token per object; learned null token first.

    Args:
        dim: token width. n_frequencies / hidden: as :class:`LocationEncoder`.
        n_colours: size of the colour vocabulary (CLEVR's 8).
    """

    @register_to_config
    def __init__(self, dim: int = 64, n_frequencies: int = 6, hidden: int = 128, n_colours: int = len(COLOUR_NAMES)) -> None:
        ModelMixin.__init__(self)  # build the parent's parts without registering its (narrower) config
        self.register_buffer("frequencies", (2.0 ** torch.arange(n_frequencies)) * math.pi, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 + 4 * n_frequencies, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.null_token = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.colour_embedding = nn.Embedding(n_colours, dim)

    def encode(self, locations: Tensor, colours: Tensor) -> Tensor:
        """``(..., 2)`` locations and ``(...)`` colour indices → ``(..., dim)`` tokens."""
        return self.mlp(self.features(locations)) + self.colour_embedding(colours)

    def forward(self, locations: Tensor, mask: Tensor | None = None, colours: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(B, K, 2)`` locations, ``(B, K)`` mask and colours → tokens ``(B, 1 + K, dim)``, mask ``(B, 1 + K)``."""
        if colours is None:
            raise ValueError("the colour encoder needs colours=(B, K) indices alongside the locations")
        B, K, _ = locations.shape
        if mask is None:
            mask = torch.ones(B, K, dtype=torch.bool, device=locations.device)
        tokens = self.encode(locations, colours)
        null = self.null_token.expand(B, 1, -1)
        full_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        return torch.cat([null, tokens], dim=1), full_mask

    def conditioning(
        self,
        locations: Tensor | Sequence[Sequence[float]],
        *,
        colours: Sequence[str | int] | Tensor | None = None,
        labels: Sequence[str] | None = None,
    ) -> Conditioning:
        """A :class:`Conditioning` with one token per (location, colour); ``colours`` names or indices."""
        loc = validate_locations(locations)
        if colours is None:
            raise ValueError("colour-conditioned model: pass colours=[...] (one name or index per location)")
        idx = colour_indices(colours)
        if len(idx) != loc.shape[0]:
            raise ValueError(f"{len(idx)} colours for {loc.shape[0]} locations")
        p = self.null_token
        tokens = self.encode(loc.to(p.device, p.dtype), idx.to(p.device)) if len(idx) else p.new_zeros((0, p.shape[1]))
        names = [COLOUR_NAMES[i] for i in idx.tolist()]
        return Conditioning.from_tokens(
            p,
            list(tokens.unbind(0)),
            labels=labels or [f"{n}{j}" for j, n in enumerate(names)],
            locations=loc.detach().float().cpu(),
            attributes={"colour": names},
        )
