"""Experiments that combine verbs (application layer): each module does the work behind one CLI command.

* :mod:`scorescope.experiments.locality_sweep` — length generalisation of a CLEVR model under locality
  interventions (``scorescope intervene locality-sweep``).
* :mod:`scorescope.experiments.feature_profile` — layer × noise-level profile of feature-space conditional
  locality (``scorescope features profile``).
* :mod:`scorescope.experiments.concepts` — colour-concept geometry against composition success
  (``scorescope features concepts``).
* :mod:`scorescope.experiments.sdxl_features` — SDXL style + content ablations and concept cosines
  (``scorescope features sdxl``).
* :mod:`scorescope.experiments.track` — locality and length generalisation through training
  (``scorescope clevr track``).
"""

__all__: list[str] = []
