"""The colour model's token vocabulary (zoo) and the renderer's palette (world) name the same colours in order."""

from interp.clevr.render import COLOUR_NAMES as RENDERED
from interp.models.clevr_colour import COLOUR_NAMES as VOCABULARY


def test_vocabulary_matches_the_renderer():
    assert VOCABULARY == RENDERED
