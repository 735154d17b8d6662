"""Deprecated location of :mod:`interp.models.coord_unet` (the model moved to the zoo).

Kept so that pipelines saved before the move, whose ``model_index.json`` names this module, still load.
"""

from interp.models.coord_unet import COORD_CHANNELS, CoordUNet2DConditionModel, coordinate_channels

__all__ = ["COORD_CHANNELS", "CoordUNet2DConditionModel", "coordinate_channels"]
