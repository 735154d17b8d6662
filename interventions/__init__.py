"""interventions: the *intervene* verb of scorescope — activation patching and locality enforcement.

>>> import interventions as iv
>>> with iv.apply(den, iv.Patch("mid_block", source=iv.FromStore(store), steps=range(10), branch="cond"),
...               iv.MaskCrossAttention("up_blocks.*attn2", radius=0.15)) as applied:
...     x = interp.sample(den, cond, shape=(B, 3, 32, 32), num_steps=25, seed=0)
>>> applied.frame()   # one row per (edit, site, step, branch) that fired

Edits (frozen dataclasses, JSON round-trip, a ``label`` for sweep rows): :class:`Patch` (sources :class:`Zero`,
:class:`FromStore`, :class:`Mean`, :class:`Fn`), :class:`MaskCrossAttention` (distance-masked cross-attention),
:class:`Compose` / :func:`ComposeScores` (feature- and score-space composition). :func:`apply` installs them
through one restorable :class:`interp.hooks.HookSet`; :func:`record` captures sites including ``"output"``;
:func:`effect` measures how much edits change the prediction; :func:`patching_sweep` patches (site, step) pairs.

Imports ``interp`` only (never ``probes``).
"""

from interventions.applied import Applied, EditConflictError, apply
from interventions.compose import soft_composition_masks
from interventions.edits import OUTPUT, Compose, ComposeScores, Edit, MaskCrossAttention, Patch
from interventions.effect import effect
from interventions.nnsight_patch import patch_nnsight
from interventions.record import Recording, record
from interventions.sources import CallInfo, FromStore, Fn, Mean, Source, Zero, source_from_dict
from interventions.sweep import patching_sweep, restored_fraction

__all__ = [
    "OUTPUT",
    "Applied",
    "CallInfo",
    "Compose",
    "ComposeScores",
    "Edit",
    "EditConflictError",
    "FromStore",
    "Fn",
    "MaskCrossAttention",
    "Mean",
    "Patch",
    "Recording",
    "Source",
    "Zero",
    "apply",
    "effect",
    "patch_nnsight",
    "patching_sweep",
    "record",
    "restored_fraction",
    "soft_composition_masks",
    "source_from_dict",
]
