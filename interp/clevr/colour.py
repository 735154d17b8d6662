"""Deprecated location of :mod:`interp.models.clevr_colour` (the encoder moved to the zoo).

Kept so that pipelines saved before the move, whose ``model_index.json`` names this module, still load.
"""

from interp.models.clevr_colour import COLOUR_NAMES, ColourLocationEncoder, colour_indices

__all__ = ["COLOUR_NAMES", "ColourLocationEncoder", "colour_indices"]
