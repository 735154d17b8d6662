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
from interp.models.clevr import LocationEncoder, check_batch_locations, validate_locations

#: CLEVR's 8 colours: the colour vocabulary of :class:`ColourLocationEncoder` (index = token colour id). The
#: renderer (:mod:`interp.clevr.render`) draws them in this order.
COLOUR_NAMES: tuple[str, ...] = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")


def colour_indices(colours: Sequence[str | int] | Tensor) -> Tensor:
    """Colour names or integer indices → ``(k,)`` int64 indices into :data:`COLOUR_NAMES`."""
    if isinstance(colours, str):  # iterating would read "red" as the colours "r", "e", "d"
        raise TypeError(f"colours must be a list with one colour per location, got the string {colours!r}; pass [{colours!r}]")
    if isinstance(colours, Tensor):
        if colours.is_floating_point() or colours.dtype == torch.bool or colours.dim() > 1:
            raise TypeError(f"colours must be a (k,) integer tensor of colour indices, got {colours.dtype} {tuple(colours.shape)}")
        colours = colours.reshape(-1).tolist()
    out = []
    for c in colours:
        if isinstance(c, str):
            if c not in COLOUR_NAMES:
                raise ValueError(f"unknown colour {c!r} in colours; choose one of {list(COLOUR_NAMES)}")
            out.append(COLOUR_NAMES.index(c))
            continue
        if isinstance(c, bool) or not hasattr(c, "__index__"):
            raise TypeError(f"colours must be names or integer indices, got {type(c).__name__} {c!r}")
        if not 0 <= int(c) < len(COLOUR_NAMES):
            raise ValueError(f"colour index {int(c)} in colours out of range [0, {len(COLOUR_NAMES)})")
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
        mask = check_batch_locations(locations, mask)
        B, K, _ = locations.shape
        if not isinstance(colours, Tensor) or colours.shape != (B, K) or colours.is_floating_point() or colours.dtype == torch.bool:
            got = f"{colours.dtype} {tuple(colours.shape)}" if isinstance(colours, Tensor) else type(colours).__name__
            raise ValueError(f"colours must be a ({B}, {K}) integer tensor of colour indices, got {got}")
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
            raise ValueError(f"{len(idx)} colours for {loc.shape[0]} locations: pass one colour per location")
        p = self.null_token
        tokens = self.encode(loc.to(p.device, p.dtype), idx.to(p.device)) if len(idx) else p.new_zeros((0, p.shape[1]))
        names = [COLOUR_NAMES[i] for i in idx.tolist()]
        return Conditioning.from_tokens(
            p,
            list(tokens.unbind(0)),
            labels=labels if labels is not None else [f"{n}{j}" for j, n in enumerate(names)],
            locations=loc.detach().cpu(),  # the caller's precision (tokens follow the encoder's dtype)
            attributes={"colour": names},
        )
