"""Paper figures from probe results and tidy frames (matplotlib + seaborn; never ``plt.show()``).

Every function returns a ``matplotlib.figure.Figure`` made without pyplot: nothing is registered globally, so
nothing needs closing and nothing is shown; save it with :func:`figure_bytes` or ``fig.savefig``.

Figures are the application's, but :meth:`interp.results.ProbeResult.plot` must reach them without ``interp``
importing the application, so the drawing lives here and imports only matplotlib, seaborn and numpy
(lazily, inside each function: importing :mod:`interp` never imports matplotlib). Writing files (atomic, the
output-folder claim, sidecars) is the application's job (:mod:`scorescope.export`); this module only draws and
renders to bytes (:func:`figure_bytes`).

Figure kinds:

* :func:`map_figure` — a result's map (attribution, locality, residual) as one panel or a grid laid out from the
  map's ``axes`` (conditioners × noise levels, pixels × noise levels, layers × noise levels), optionally over an
  image, with a colorbar that says what the colours mean and in which units (:func:`colorbar_label`);
* :func:`metric_heatmap` — any metric of a tidy frame, one axis against another, mean over seeds, annotated;
  :func:`layer_heatmap` (layer × t) and :func:`intervention_heatmap` (intervention × k) are its two uses;
* :func:`length_curves` — a metric against the number of objects k, one line per model, the training range
  shaded, and a confidence band (``lo`` / ``hi`` columns when the frame carries binomial intervals, else
  seaborn's ``errorbar=`` over seeds);
* :func:`cosine_matrix` — the concept cosine matrix of :func:`probes.concept_cosines`;
* :func:`plot` — the right kind for a :class:`~interp.results.ProbeResult`.

Normalisation of map colours (``norm=``):

* ``"panel"``: every panel its own range and colorbar;
* ``"shared"``: one range over all panels, one colorbar;
* ``"symmetric"``: shared and centred, ``vmin = -vmax`` with ``vmax = max |value|``, diverging colours (signed maps);
* ``"log"``: shared, logarithmic; values below the *floor* ``log_floor × max`` (default :data:`LOG_FLOOR`
  ``= 1e-4``, four decades) — zeros included — are drawn at the floor, so the figure holds no NaN or inf.
  For Jacobian maps whose self-pixel swamps a linear scale. Refused for maps with negative values;
* ``"auto"`` (default): ``"symmetric"`` when the map has negative values, ``"log"`` for pixel-locality maps
  (``G``, probe ``pixel_locality``), otherwise ``"shared"``.

Sizes: ``width="one-column"`` (3.25 in) or ``"two-column"`` (6.75 in) or a number of inches; fonts 7 pt
(ticks 6 pt), TrueType in PDF and text kept as text in SVG, so the figure drops into a paper at 100 %.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Paper widths in inches.
WIDTHS = {"one-column": 3.25, "two-column": 6.75}
#: Accepted ``norm=`` values.
NORMS = ("auto", "panel", "shared", "symmetric", "log")
#: Default log floor, relative to the largest value (four decades below it).
LOG_FLOOR = 1e-4
#: Axes summed over before drawing (a map is drawn per pixel, not per channel).
CHANNEL_AXES = ("c_out", "c_in", "channel")
#: Formats :func:`figure_bytes` renders.
FORMATS = ("pdf", "svg", "png")

# What each known map measures, and in which units ({q}: "prediction" or "score", from metadata["quantity"]).
_MEANINGS: dict[tuple[str, str], str] = {
    ("pixel_locality", "G"): "|∂D_i/∂x_j| summed over channels ({q} units per input unit)",
    ("pixel_locality", "jacobian"): "∂D_i/∂x_j ({q} units per input unit)",
    ("conditional_locality", "jvp"): "‖∂D_i/∂c_j‖_F over channels ({q} units per token unit)",
    ("conditional_locality", "ablation"): "‖D_i(c) − D_i(c∖j)‖ over channels ({q} units)",
    ("conditional_locality", "attribution"): "(∂D_i/∂c_j)·(c_j − b_j) ({q} units)",
    ("integrated_gradients", "attribution"): "integrated gradients of D_i w.r.t. c_j ({q} units)",
    ("cpc_residual", "residual"): "‖s_i(c) − composed s_i‖ over channels, unnormalised (score units)",
    ("cpc_residual", "masks"): "composition mask m_j (weight, unitless)",
    ("feature_dependence", "jvp"): "‖∂h_i/∂c_j‖ over channels (activation units per token unit)",
    ("feature_dependence", "ablation"): "‖h_i(c) − h_i(c∖j)‖ over channels (activation units)",
    ("linear_probe_map", "accuracy"): "linear-probe accuracy (fraction)",
    ("linear_probe_map", "nonzero_fraction"): "nonzero activations (fraction)",
    ("concept_cosines", "cosine"): "cosine similarity of concept directions (unitless)",
}


def paper_rc(width: str | float = "one-column") -> dict[str, Any]:
    """matplotlib rcParams for paper figures (7 pt text, editable text in PDF / SVG)."""
    paper_width(width)
    return {
        "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 6, "ytick.labelsize": 6,
        "legend.fontsize": 6, "figure.titlesize": 7, "axes.linewidth": 0.5, "lines.linewidth": 1.0,
        "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "savefig.dpi": 300,
    }


def paper_width(width: str | float) -> float:
    """Inches for ``"one-column"`` / ``"two-column"`` / a positive number; ``ValueError`` naming ``width`` otherwise."""
    if isinstance(width, str):
        if width not in WIDTHS:
            raise ValueError(f"width must be one of {', '.join(WIDTHS)} or a number of inches, got {width!r}")
        return WIDTHS[width]
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive number of inches, got {width!r}")
    return float(width)


def colorbar_label(probe: str, name: str, metadata: Mapping[str, Any] | None = None) -> str:
    """What the colours of map ``name`` of a ``probe`` result mean, with units.

    From the probe and map name and ``metadata["quantity"]`` (``"prediction"`` or ``"score"``); a map scorescope
    does not know is labelled with its name and ``(units not recorded)`` rather than a guess.
    """
    metadata = metadata or {}
    q = str(metadata.get("quantity", "prediction"))
    if name.startswith("n_eff_"):
        return f"effective number of conditioners of the {name[6:]} map (count)"
    text = _MEANINGS.get((probe, name))
    if text is None:
        return f"{name} (units not recorded)"
    return text.format(q=q)


# ------------------------------------------------------------------------------------------------ maps
@dataclass
class Panels:
    """A map laid out as a grid: ``data (R, C, H, W)`` float64, and what its rows and columns are."""

    data: np.ndarray
    row_axis: str | None
    row_labels: list[str]
    col_axis: str | None
    col_labels: list[str]
    reduced: tuple[str, ...]  # channel axes summed over


def _labels(axis: str, n: int, metadata: Mapping[str, Any], extra: Mapping[str, Any]) -> list[str]:
    if axis == "t":
        levels = metadata.get("levels")
        if isinstance(levels, (list, tuple)) and len(levels) == n:
            return [f"t = {float(v):g}" for v in levels]
    if axis == "pixel" and "pixels" in extra:
        px = np.asarray(extra["pixels"])
        if px.shape == (n, 2):
            return [f"pixel ({int(r)}, {int(c)})" for r, c in px]
    if axis == "site":
        sites = metadata.get("sites")
        if isinstance(sites, (list, tuple)) and len(sites) == n:
            return [str(s) for s in sites]
    if axis == "conditioner":
        named = extra.get("conditioner_labels", {})
        return [f"c{j}: {named[j]}" if j in named else f"c{j}" for j in range(n)]
    return [f"{axis} {i}" for i in range(n)]


def map_panels(result: Any, name: str, *, select: Mapping[str, int] | None = None) -> Panels:
    """Lay out ``result.maps[name]`` as panels: the last two axes are the image, channel axes are summed,
    axes in ``select`` are indexed, and at most two axes may remain (rows, columns; ``t`` goes on the columns).

    Raises:
        ValueError: ``name`` is not a map of the result (the message lists the maps), a ``select`` axis or index
            the map does not have, or more than two axes left to lay out (the message says which to ``select``).
    """
    if name not in result.maps:
        raise ValueError(f"{result.probe} result has no map {name!r}; maps: {', '.join(sorted(result.maps))}")
    arr = np.asarray(result.maps[name], dtype=np.float64)
    axes = list(result.axes.get(name, ()))
    if len(axes) != arr.ndim:
        axes = [f"axis{i}" for i in range(arr.ndim - 2)] + ["row", "col"]
    if arr.ndim < 2:
        raise ValueError(f"map {name!r} has shape {arr.shape}: a figure needs at least two (image) axes")
    for axis, index in dict(select or {}).items():
        if axis not in axes[:-2]:
            raise ValueError(f"select: map {name!r} has no axis {axis!r}; its axes are {tuple(axes)}")
        pos = axes.index(axis)
        if not 0 <= int(index) < arr.shape[pos]:
            raise ValueError(f"select: {axis}={index} is out of range for map {name!r} ({arr.shape[pos]} along {axis})")
        arr = np.take(arr, int(index), axis=pos)
        axes.pop(pos)
    reduced = tuple(a for a in axes[:-2] if a in CHANNEL_AXES)
    for axis in reduced:
        pos = axes.index(axis)
        arr = arr.sum(axis=pos)
        axes.pop(pos)
    lead = axes[:-2]
    if len(lead) > 2:
        raise ValueError(f"map {name!r} has {len(lead)} axes besides the image ({tuple(lead)}); pick some with "
                         f"select={{axis: index}} so that at most two remain")
    extra: dict[str, Any] = {"pixels": result.maps["pixels"]} if "pixels" in result.maps else {}
    # Conditioner labels live in the summary rows (``label`` beside ``conditioner``).
    extra["conditioner_labels"] = {int(r["conditioner"]): str(r["label"]) for r in result.rows
                                   if r.get("conditioner") is not None and r.get("label") is not None}
    if len(lead) == 2 and lead[0] == "t":  # noise levels across the columns
        arr = np.swapaxes(arr, 0, 1)
        lead = [lead[1], lead[0]]
    while len(lead) < 2:
        arr = arr[None]
        lead = [None, *lead]
    data = arr.reshape(arr.shape[0], arr.shape[1], *arr.shape[-2:])
    row_axis, col_axis = lead
    rows = _labels(row_axis, data.shape[0], result.metadata, extra) if row_axis else [""]
    cols = _labels(col_axis, data.shape[1], result.metadata, extra) if col_axis else [""]
    return Panels(data, row_axis, rows, col_axis, cols, reduced)


@dataclass
class Scale:
    """The colour scale of one set of panels: ``kind`` (``panel``/``shared``/``symmetric``/``log``), limits, floor."""

    kind: str
    vmin: float
    vmax: float
    floor: float | None = None

    def norm(self) -> Any:
        from matplotlib.colors import LogNorm, Normalize

        return LogNorm(self.vmin, self.vmax) if self.kind == "log" else Normalize(self.vmin, self.vmax)

    def display(self, data: np.ndarray) -> np.ndarray:
        """The array drawn (log: clipped below at the floor, so zeros are finite)."""
        return np.maximum(data, self.floor) if self.kind == "log" else data


def resolve_norm(norm: str, data: np.ndarray, *, probe: str = "", name: str = "") -> str:
    """``"auto"`` → the concrete normalisation for ``data`` (see the module docstring); checks ``norm``."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    finite = data[np.isfinite(data)]
    negative = bool(finite.size and finite.min() < 0)
    if norm == "auto":
        if negative:
            return "symmetric"
        return "log" if (probe, name) == ("pixel_locality", "G") else "shared"
    if norm == "log" and negative:
        raise ValueError(f"norm='log' needs a non-negative map, but {name or 'the map'} has negative values "
                         f"(min {finite.min():.3g}); use norm='symmetric'")
    return norm


def scale_of(data: np.ndarray, kind: str, *, log_floor: float = LOG_FLOOR) -> Scale:
    """The :class:`Scale` of ``data`` (finite values only) for a concrete ``kind`` (not ``"auto"``)."""
    if not 0 < log_floor < 1:
        raise ValueError(f"log_floor must be in (0, 1) (a fraction of the largest value), got {log_floor!r}")
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if kind == "symmetric":
        m = max(abs(lo), abs(hi)) or 1.0
        return Scale(kind, -m, m)
    if kind == "log":
        top = hi if hi > 0 else 1.0  # an all-zero map: a blank figure at the floor, not a NaN
        return Scale(kind, top * log_floor, top, floor=top * log_floor)
    if hi <= lo:
        hi = lo + 1.0
    return Scale(kind, lo, hi)


def _grey(image: Any, shape: tuple[int, int]) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[-1] not in (1, 3, 4):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 3:
        img = img[..., :3].mean(-1)
    if img.shape != shape:
        raise ValueError(f"image must be (H, W), (C, H, W) or (H, W, C) with H, W = {shape} like the map, got {np.shape(image)}")
    lo, hi = np.nanmin(img), np.nanmax(img)
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def map_figure(result: Any, name: str, *, norm: str = "auto", width: str | float = "one-column",
               select: Mapping[str, int] | None = None, image: Any = None, alpha: float = 0.6,
               cmap: str | None = None, label: str | None = None, log_floor: float = LOG_FLOOR,
               title: str | None = None) -> Any:
    """Draw map ``name`` of ``result`` as a panel grid (see :func:`map_panels`) with a labelled colorbar.

    Args:
        result: a :class:`~interp.results.ProbeResult`.
        name: the map (``"G"``, ``"jvp"``, ...). select: axes to index (``{"conditioner": 0}``).
        norm: colour normalisation (module docstring). width: paper width.
        image: optional ``(H, W)`` / ``(C, H, W)`` / ``(H, W, C)`` image drawn in grey under every panel
            (the map on top with ``alpha``).
        cmap: colour map (default ``magma``, ``RdBu_r`` for symmetric). label: colorbar label (default
            :func:`colorbar_label`). log_floor: the log floor as a fraction of the largest value.

    Returns:
        the matplotlib ``Figure``; ``fig.scorescope`` holds the panels, the scale(s) and the label.
    """
    import matplotlib as mpl
    from matplotlib.figure import Figure

    panels = map_panels(result, name, select=select)
    kind = resolve_norm(norm, panels.data, probe=result.probe, name=name)
    label = label or colorbar_label(result.probe, name, result.metadata)
    if panels.reduced and "channels" not in label:
        label = f"{label}, summed over {', '.join(panels.reduced)}"
    R, C, H, W = panels.data.shape
    inches = paper_width(width)
    cbar_in = 0.75 if kind == "panel" else 0.6
    side = min(1.6, (inches - cbar_in) / C)
    with mpl.rc_context(paper_rc(width)):
        fig = Figure(figsize=(inches, side * R * H / W + 0.45 + 0.1 * bool(title)), layout="constrained")
        axes = fig.subplots(R, C, squeeze=False)
        grey = _grey(image, (H, W)) if image is not None else None
        shared = scale_of(panels.data, kind, log_floor=log_floor) if kind != "panel" else None
        cm = cmap or ("RdBu_r" if kind == "symmetric" else "magma")
        scales = []
        last = None
        for r in range(R):
            for c in range(C):
                ax = axes[r, c]
                sc = shared or scale_of(panels.data[r, c], kind, log_floor=log_floor)
                scales.append(sc)
                if grey is not None:
                    ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                last = ax.imshow(sc.display(panels.data[r, c]), norm=sc.norm(), cmap=cm, interpolation="nearest",
                                 alpha=alpha if grey is not None else None)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 and panels.col_axis:
                    ax.set_title(panels.col_labels[c])
                if c == 0 and panels.row_axis:
                    ax.set_ylabel(panels.row_labels[r])
                if shared is None:
                    cb = fig.colorbar(last, ax=ax, shrink=0.9)
                    cb.ax.tick_params(labelsize=5)
                    if c == C - 1:
                        cb.set_label(label, fontsize=6)
        if shared is not None:
            cb = fig.colorbar(last, ax=axes.ravel().tolist(), shrink=0.9)
            cb.set_label(label, fontsize=6)
            if kind == "log":
                cb.ax.set_title(f"floor {shared.floor:.2g}", fontsize=5)
        if title:
            fig.suptitle(title)
    fig.scorescope = {"panels": panels, "scale": kind, "scales": scales, "label": label}
    return fig


def figure_bytes(fig: Any, fmt: str, *, dpi: int = 300) -> bytes:
    """Render ``fig`` as ``fmt`` (``pdf``, ``svg`` (vector) or ``png`` at ``dpi``) without touching the disk."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    import matplotlib as mpl
    from matplotlib.figure import Figure

    buf = io.BytesIO()
    with mpl.rc_context({"pdf.fonttype": 42, "svg.fonttype": "none", "svg.hashsalt": "scorescope"}):
        # Fixed metadata so the same figure gives the same bytes (no creation date in PDF / SVG).
        meta = {"CreationDate": None} if fmt == "pdf" else ({"Date": None} if fmt == "svg" else None)
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=meta)
    # Keep the layout the first save computed: the next formats lay out nothing again (the constrained layout is
    # most of a save's cost, measured here).
    fig.set_layout_engine("none")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ tidy frames
def _metric_values(frame: Any, metric: str) -> Any:
    """Rows of ``metric`` with its values in ``value``: a tidy frame (``metric``/``value`` columns) or a wide one
    (a column named ``metric``)."""
    if "metric" in frame.columns and "value" in frame.columns and (frame["metric"] == metric).any():
        return frame[frame["metric"] == metric]
    if metric in frame.columns:
        return frame.assign(value=frame[metric])
    have = sorted(set(frame["metric"])) if "metric" in frame.columns else sorted(frame.columns)
    raise ValueError(f"metric {metric!r} is not in the frame; metrics: {', '.join(map(str, have))}")


def _seeds(df: Any) -> int:
    return int(df["seed"].nunique()) if "seed" in df.columns and df["seed"].notna().any() else 1


def metric_heatmap(frame: Any, metric: str, *, index: str, columns: str, width: str | float = "one-column",
                   fmt: str = ".2g", cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
                   label: str | None = None) -> Any:
    """``metric`` as an ``index`` × ``columns`` heatmap, mean over seeds (and any other rows), every cell annotated.

    Args:
        frame: tidy (``metric``, ``value``, ...) or wide (a column per metric) pandas frame.
        index / columns: the frame columns on the two axes (``"site"`` × ``"t"``, ``"intervention"`` × ``"k"``).

    Returns:
        the ``Figure``; ``fig.scorescope["grid"]`` is the plotted table of means.
    """
    import matplotlib as mpl
    from matplotlib.figure import Figure
    import seaborn as sns

    df = _metric_values(frame, metric)
    for col in (index, columns):
        if col not in df.columns:
            raise ValueError(f"the frame has no column {col!r}; columns: {', '.join(map(str, df.columns))}")
    order = list(dict.fromkeys(df[index]))
    grid = df.pivot_table(index=index, columns=columns, values="value", aggfunc="mean", sort=True).reindex(order)
    n = _seeds(df)
    inches = paper_width(width)
    with mpl.rc_context(paper_rc(width)):
        fig = Figure(figsize=(inches, 0.6 + 0.2 * len(order)), layout="constrained")
        ax = fig.subplots()
        sns.heatmap(grid.astype(float), annot=True, fmt=fmt, annot_kws={"size": 5}, cmap=cmap, vmin=vmin, vmax=vmax,
                    ax=ax, cbar_kws={"label": label or (f"{metric} (mean over {n} seeds)" if n > 1 else metric)})
        ax.set_xlabel(columns)
        ax.set_ylabel(index)
    fig.scorescope = {"grid": grid, "seeds": n}
    return fig


def layer_heatmap(frame: Any, metric: str, *, layer: str = "site", **kw: Any) -> Any:
    """Layer × noise-level heatmap of ``metric`` (mean over seeds): :func:`metric_heatmap` with ``columns="t"``."""
    return metric_heatmap(frame, metric, index=layer, columns="t", **kw)


def intervention_heatmap(frame: Any, metric: str = "recall", **kw: Any) -> Any:
    """Intervention × k heatmap of ``metric`` (a fraction: colours fixed to [0, 1]); :func:`metric_heatmap`."""
    kw.setdefault("vmin", 0.0)
    kw.setdefault("vmax", 1.0)
    return metric_heatmap(frame, metric, index="intervention", columns="k", **kw)


def length_curves(frame: Any, metric: str = "count_acc", *, x: str = "k", hue: str = "model",
                  train_range: tuple[float, float] | None = None, errorbar: Any = ("ci", 95),
                  width: str | float = "one-column", ylabel: str | None = None) -> Any:
    """Length generalisation: ``metric`` against ``x`` (objects k), one line per ``hue`` (model).

    Intervals: when the frame has ``lo`` / ``hi`` columns and one row per (``hue``, ``x``) — binomial intervals
    the application computed (:func:`scorescope.export.length_figure` pools seeds into Wilson intervals) —
    they are the band; otherwise seaborn draws ``errorbar`` over the rows (seeds) of each point.
    ``train_range`` = (first, last) k seen in training, shaded.
    """
    import matplotlib as mpl
    from matplotlib.figure import Figure
    import seaborn as sns

    df = _metric_values(frame, metric)
    for col in (x, hue):
        if col not in df.columns:
            raise ValueError(f"the frame has no column {col!r}; columns: {', '.join(map(str, df.columns))}")
    pooled = {"lo", "hi"} <= set(df.columns) and not df.duplicated([hue, x]).any()
    inches = paper_width(width)
    with mpl.rc_context(paper_rc(width)):
        fig = Figure(figsize=(inches, inches * 0.62), layout="constrained")
        ax = fig.subplots()
        if train_range is not None:
            ax.axvspan(train_range[0] - 0.5, train_range[1] + 0.5, color="0.9", zorder=0, label="training range")
        sns.lineplot(data=df, x=x, y="value", hue=hue, marker="o", markersize=3, ax=ax,
                     errorbar=None if pooled else errorbar)
        if pooled:
            colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
            for key, part in df.sort_values(x).groupby(hue, sort=False):
                ax.fill_between(part[x], part["lo"], part["hi"], alpha=0.25, linewidth=0,
                                color=colours.get(str(key)))
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # k counts objects
        ax.set_xlabel("objects k" if x == "k" else x)
        ax.set_ylabel(ylabel or metric.replace("_", " "))
        ax.legend(frameon=False)
    fig.scorescope = {"pooled_intervals": pooled, "seeds": _seeds(df)}
    return fig


def cosine_matrix(cos: Any, labels: Sequence[str] | None = None, *, width: str | float = "one-column",
                  title: str | None = None) -> Any:
    """An ``(n, n)`` cosine matrix (a :func:`probes.concept_cosines` result or an array), colours fixed to
    [−1, 1] (symmetric), annotated."""
    import matplotlib as mpl
    from matplotlib.figure import Figure
    import seaborn as sns

    if hasattr(cos, "maps"):
        labels = labels or cos.metadata.get("concepts")
        title = title or f"{cos.metadata.get('site', '')}, t = {cos.metadata.get('t', '')}"
        cos = cos.maps["cosine"]
    mat = np.asarray(cos, dtype=np.float64)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"a cosine matrix is (n, n), got {mat.shape}")
    labels = list(labels) if labels is not None else [str(i) for i in range(mat.shape[0])]
    inches = paper_width(width)
    with mpl.rc_context(paper_rc(width)):
        fig = Figure(figsize=(inches, inches * 0.85), layout="constrained")
        ax = fig.subplots()
        sns.heatmap(mat, vmin=-1, vmax=1, center=0, cmap="RdBu_r", annot=True, fmt=".2f", annot_kws={"size": 5},
                    xticklabels=labels, yticklabels=labels, square=True, ax=ax,
                    cbar_kws={"label": _MEANINGS[("concept_cosines", "cosine")]})
        if title:
            ax.set_title(title)
    return fig


#: The map each probe's figure shows by default.
PRIMARY_MAP = {"pixel_locality": "G", "conditional_locality": ("jvp", "attribution", "ablation"),
               "integrated_gradients": "attribution", "cpc_residual": "residual",
               "feature_dependence": ("jvp", "ablation"), "linear_probe_map": "accuracy"}


def default_map(result: Any) -> str:
    """The map :func:`plot` draws for ``result`` (:data:`PRIMARY_MAP`, else its first image-like map)."""
    wanted = PRIMARY_MAP.get(result.probe, ())
    for name in (wanted,) if isinstance(wanted, str) else wanted:
        if name in result.maps:
            return name
    for name, axes in result.axes.items():
        if tuple(axes[-2:]) == ("row", "col"):
            return name
    raise ValueError(f"{result.probe} result has no map with image axes (row, col) to draw; maps: "
                     f"{', '.join(sorted(result.maps)) or 'none'}")


def plot(result: Any, name: str | None = None, **kw: Any) -> Any:
    """The figure for a :class:`~interp.results.ProbeResult`: :func:`cosine_matrix` for ``concept_cosines``,
    otherwise :func:`map_figure` of ``name`` (default :func:`default_map`). Keywords go to that function."""
    if result.probe == "concept_cosines" and name in (None, "cosine"):
        return cosine_matrix(result, **kw)
    return map_figure(result, name or default_map(result), **kw)


__all__ = [
    "CHANNEL_AXES", "FORMATS", "LOG_FLOOR", "NORMS", "PRIMARY_MAP", "Panels", "Scale", "WIDTHS", "colorbar_label",
    "cosine_matrix", "default_map", "figure_bytes", "intervention_heatmap", "layer_heatmap", "length_curves",
    "map_figure", "map_panels", "metric_heatmap", "paper_rc", "paper_width", "plot", "resolve_norm", "scale_of",
]
