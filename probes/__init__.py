"""probes: measure locality of a conditional diffusion model (the *probe* verb of scorescope).

Every probe takes a :class:`interp.Denoiser` (any module with the ``UNet2DConditionModel`` call signature),
a :class:`interp.Conditioning`, noise levels (fractions of the schedule) and seeds, and returns a
:class:`ProbeResult`: maps with metadata plus a tidy ``pandas.DataFrame`` via ``.frame()``.

* :func:`pixel_locality` — Jacobian maps ∂D_i/∂x, Niedoba's aggregate G(i, j), mass summaries
  (dense batched VJPs, or ``method="compressed"``: :func:`compressed_jacobian`, certified colourings);
* :func:`conditional_locality` — ∂D/∂c_j by forward-mode JVP and ablation maps, in-region / leakage /
  effective number of conditioners;
* :func:`cpc_residual` — distance of the score from the masked composition of single-conditioner scores;
* :func:`feature_dependence`, :func:`concept_cosines`, :func:`linear_probe_map` — the same questions on a
  layer's activation;
* :func:`integrated_gradients_map` — captum baseline in the conditional maps' format;
* :func:`locality_sweep` — sites × noise levels × seeds, resumable, one tidy frame.

Quick start::

    import probes
    from interp.models import clevr_pipeline

    pipe = clevr_pipeline("tiny", seed=0)
    den, cond = pipe.denoiser(), pipe.conditioning([[0.2, 0.3], [0.7, 0.8]])
    r = probes.conditional_locality(den, cond, t=[0.1, 0.5, 0.9], seeds=4)
    r["jvp"]                      # (T, k, H, W) maps of ||dD_i/dc_j||
    r.frame().query("metric == 'in_region'")
    df = probes.locality_sweep(den, cond, sites=["output", "*attn2"], t=probes.log_levels(8), out="sweep/")

Protocols marked *(ours)* in the module docstrings (x₀ = 0 inputs without data, region / leakage
definitions, CPC masks, random JVP directions, the compression certificate, sweep storage) are the
toolkit's choices where the paper is silent (SCIENCE.md).
"""

from probes.baselines import integrated_gradients_map
from probes.compressed import CompressedJacobian, compressed_jacobian
from probes.conditional import conditional_locality, conditioner_jvp
from interp.masks import composition_masks
from probes.cpc import cpc_residual
from probes.features import concept_cosines, feature_dependence, layer_dependence, linear_probe_map
from interp.forward_mode import forward_mode_ready
from interp.inputs import forward_samples, log_levels
from probes.jacobian import aggregate_map, pixel_jacobian, pixel_locality
from interp.results import ProbeResult, concat_frames
from probes.summaries import (
    effective_conditioners,
    channel_sparsity,
    hoyer_sparsity,
    mass_outside,
    mass_radius,
    mass_square_side,
    participation_ratio,
    pixel_summaries,
    region_fractions,
)
from probes.sweep import locality_sweep, read_sweep

__all__ = [
    "CompressedJacobian",
    "ProbeResult",
    "aggregate_map",
    "compressed_jacobian",
    "concat_frames",
    "concept_cosines",
    "conditional_locality",
    "conditioner_jvp",
    "composition_masks",
    "cpc_residual",
    "effective_conditioners",
    "feature_dependence",
    "forward_mode_ready",
    "forward_samples",
    "hoyer_sparsity",
    "layer_dependence",
    "channel_sparsity",
    "integrated_gradients_map",
    "linear_probe_map",
    "locality_sweep",
    "log_levels",
    "mass_outside",
    "mass_radius",
    "mass_square_side",
    "participation_ratio",
    "pixel_jacobian",
    "pixel_locality",
    "pixel_summaries",
    "read_sweep",
    "region_fractions",
]
