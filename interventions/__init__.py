"""interventions: activation patching and locality enforcement (the *intervene* verb of scorescope).

Not implemented yet: this package is reserved for the interventions issue (activation patching at sites,
distance-masked cross-attention, feature- and score-space composition). It will import ``interp``'s nouns
only, never ``probes``.
"""

__all__: list[str] = []
