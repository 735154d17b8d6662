"""scorescope's application layer: the ``scorescope`` command line, the demo, and experiments that combine verbs.

The layers below (see ``docs/ARCHITECTURE.md``): ``interp`` is the substrate (Denoiser, Conditioning, Site,
hooks, capture, inputs, results, the model zoo and the CLEVR world); ``probes`` and ``interventions`` are
the verbs, siblings that import only ``interp``. This package sits on top and may import all of them;
nothing below imports it.
"""

from interp import __version__

__all__ = ["__version__"]
