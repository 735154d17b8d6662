"""Experiments that combine verbs (application layer): each module does the work behind one CLI command.

* :mod:`scorescope.experiments.locality_sweep` — length generalisation of a CLEVR model under locality
  interventions (``scorescope intervene locality-sweep``).
"""

__all__: list[str] = []
