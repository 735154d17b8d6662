"""interp.figures: map grids with labelled colorbars, normalisations, and figures from tidy frames."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from interp import figures  # noqa: E402
from interp.results import ProbeResult  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def pixel_result() -> ProbeResult:
    """A Jacobian-like map: a dominant self-pixel, exact zeros elsewhere (t × pixel × H × W = 2 × 3 × 8 × 8)."""
    g = torch.zeros(2, 3, 8, 8)
    for p, (r, c) in enumerate([(1, 1), (4, 4), (6, 2)]):
        g[:, p, r, c] = 100.0
        g[:, p, r, (c + 1) % 8] = 0.01
    r = ProbeResult("pixel_locality", metadata={"model": "m", "site": "output", "quantity": "prediction", "levels": [0.5, 0.9]})
    r.maps["G"] = g
    r.axes["G"] = ("t", "pixel", "row", "col")
    r.maps["pixels"] = torch.tensor([[1, 1], [4, 4], [6, 2]])
    r.axes["pixels"] = ("pixel", "row_col")
    return r


def signed_result() -> ProbeResult:
    gen = torch.Generator().manual_seed(0)
    r = ProbeResult("conditional_locality", metadata={"quantity": "score", "levels": [0.1, 0.5, 0.9]})
    r.maps["attribution"] = torch.randn(3, 2, 3, 6, 6, generator=gen) - 0.3  # (t, conditioner, c_out, row, col)
    r.axes["attribution"] = ("t", "conditioner", "c_out", "row", "col")
    r.add("mass", 1.0, t=0.1, conditioner=0, label="red cube")
    r.add("mass", 1.0, t=0.1, conditioner=1, label="blue sphere")
    return r


def colorbar_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def map_images(fig):
    """The map images (the last image of every non-colorbar axis: the map is drawn over an optional image)."""
    return [ax.get_images()[-1] for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_images()]


def test_log_norm_handles_zeros_with_the_documented_floor():
    r = pixel_result()
    fig = figures.map_figure(r, "G", norm="log")
    ims = map_images(fig)
    assert len(ims) == 6  # 3 pixels × 2 noise levels
    vmax = float(r["G"].max())
    for im in ims:
        shown = np.asarray(im.get_array())
        assert np.isfinite(shown).all()
        assert shown.min() == pytest.approx(vmax * figures.LOG_FLOOR)  # zeros drawn at the floor
        assert im.norm.vmin == pytest.approx(vmax * figures.LOG_FLOOR) and im.norm.vmax == pytest.approx(vmax)
        assert isinstance(im.norm, matplotlib.colors.LogNorm)
        assert im.get_interpolation() == "nearest"  # one map pixel, one square
    label = "|∂D_i/∂x_j| summed over channels (prediction units per input unit)"
    assert colorbar_labels(fig) == [label]
    assert fig.scorescope["scale"] == "log"
    assert figures.resolve_norm("auto", r["G"].numpy(), probe="pixel_locality", name="G") == "log"


def test_log_norm_of_an_all_zero_map_is_finite():
    r = pixel_result()
    r.maps["G"] = torch.zeros_like(r["G"])
    fig = figures.map_figure(r, "G", norm="log", log_floor=1e-3)
    for im in map_images(fig):
        assert np.isfinite(np.asarray(im.get_array())).all()
        assert im.norm.vmin == pytest.approx(1e-3) and im.norm.vmax == 1.0


def test_symmetric_norm_is_centred_and_auto_for_signed_maps():
    r = signed_result()
    fig = figures.map_figure(r, "attribution")  # auto → symmetric: the map has negative values
    assert fig.scorescope["scale"] == "symmetric"
    summed = r["attribution"].double().sum(2).numpy()
    m = np.abs(summed).max()
    for im in map_images(fig):
        assert im.norm.vmin == -im.norm.vmax == pytest.approx(-m)
    # conditioners on rows (labels from the summary rows), noise levels on columns
    panels = fig.scorescope["panels"]
    assert panels.row_labels == ["c0: red cube", "c1: blue sphere"] and panels.col_labels == ["t = 0.1", "t = 0.5", "t = 0.9"]
    np.testing.assert_array_equal(panels.data[1, 2], summed[2, 1])
    assert colorbar_labels(fig) == ["(∂D_i/∂c_j)·(c_j − b_j) (score units), summed over c_out"]
    with pytest.raises(ValueError, match="non-negative.*symmetric"):
        figures.map_figure(r, "attribution", norm="log")


def test_panel_norm_gives_every_panel_its_own_range_and_shared_one():
    r = pixel_result()
    r.maps["G"][1] *= 10  # the second noise level ten times larger
    fig = figures.map_figure(r, "G", norm="panel")
    tops = sorted({round(im.norm.vmax, 6) for im in map_images(fig)})
    assert tops == [100.0, 1000.0]
    assert len(colorbar_labels(fig)) == 6 and colorbar_labels(fig).count(figures.colorbar_label("pixel_locality", "G")) == 3
    fig = figures.map_figure(r, "G", norm="shared")
    assert {im.norm.vmax for im in map_images(fig)} == {1000.0} and {im.norm.vmin for im in map_images(fig)} == {0.0}


def test_paper_widths_and_overlay():
    r = pixel_result()
    assert figures.map_figure(r, "G", width="one-column").get_size_inches()[0] == pytest.approx(3.25)
    fig = figures.map_figure(r, "G", width="two-column")
    assert fig.get_size_inches()[0] == pytest.approx(6.75)
    ax = fig.axes[0]
    assert ax.title.get_fontsize() == 7 and ax.yaxis.label.get_fontsize() == 7  # 7 pt text for a paper at 100 %
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    fig = figures.map_figure(r, "G", image=image, alpha=0.5)
    ax = [a for a in fig.axes if a.get_label() != "<colorbar>"][0]
    under, over = ax.get_images()
    grey = image.double().numpy().mean(0)
    np.testing.assert_allclose(np.asarray(under.get_array()), (grey - grey.min()) / (grey.max() - grey.min()))
    assert over.get_alpha() == 0.5
    with pytest.raises(ValueError, match="image must be"):
        figures.map_figure(r, "G", image=torch.rand(5, 5))
    with pytest.raises(ValueError, match="width must be one of one-column, two-column"):
        figures.map_figure(r, "G", width="three-column")


def test_bad_map_names_select_and_layout_are_refused():
    r = pixel_result()
    with pytest.raises(ValueError, match=r"no map 'jvp'; maps: G, pixels"):
        figures.map_figure(r, "jvp")
    with pytest.raises(ValueError, match="no axis 'conditioner'"):
        figures.map_figure(r, "G", select={"conditioner": 0})
    with pytest.raises(ValueError, match="out of range"):
        figures.map_figure(r, "G", select={"pixel": 3})
    fig = figures.map_figure(r, "G", select={"pixel": 1})
    assert len(map_images(fig)) == 2 and fig.scorescope["panels"].row_axis is None
    r.maps["big"] = torch.zeros(2, 2, 2, 4, 4)
    r.axes["big"] = ("t", "a", "b", "row", "col")
    with pytest.raises(ValueError, match="select="):
        figures.map_figure(r, "big")
    with pytest.raises(ValueError, match="norm must be one of"):
        figures.map_figure(r, "G", norm="linear")


def tidy(seeds=(0, 1, 2)) -> pd.DataFrame:
    rows = []
    for s in seeds:
        for i, site in enumerate(["down.attn2", "mid.attn2"]):
            for t in (0.1, 0.9):
                rows.append({"metric": "in_region", "value": 0.1 * i + t + 0.01 * s, "site": site, "t": t, "seed": s})
                rows.append({"metric": "n_eff", "value": 2.0, "site": site, "t": t, "seed": s})
    return pd.DataFrame(rows)


def test_layer_heatmap_is_the_mean_over_seeds_and_annotated():
    df = tidy()
    fig = figures.layer_heatmap(df, "in_region")
    grid = fig.scorescope["grid"]
    want = df[df.metric == "in_region"].groupby(["site", "t"])["value"].mean().unstack()
    pd.testing.assert_frame_equal(grid, want, check_names=False)
    ax = fig.axes[0]
    assert len(ax.texts) == 4  # one annotation per cell
    assert [tx.get_text() for tx in ax.texts] == [format(v, ".2g") for v in grid.to_numpy().ravel()]
    assert fig.axes[1].get_ylabel() == "in_region (mean over 3 seeds)"
    with pytest.raises(ValueError, match="metric 'recal' is not in the frame; metrics: in_region, n_eff"):
        figures.layer_heatmap(df, "recal")


def test_intervention_heatmap_of_a_wide_frame():
    df = pd.DataFrame({"intervention": ["unpatched", "mask:up", "unpatched", "mask:up"], "k": [2, 2, 4, 4],
                       "recall": [0.9, 1.0, 0.4, 0.8]})
    fig = figures.intervention_heatmap(df, "recall")
    grid = fig.scorescope["grid"]
    assert list(grid.index) == ["unpatched", "mask:up"] and grid.loc["mask:up", 4] == 0.8
    assert fig.axes[0].collections[0].norm.vmin == 0.0 and fig.axes[0].collections[0].norm.vmax == 1.0


def length_frame(seeds=(0, 1)) -> pd.DataFrame:
    rows = []
    for model, acc in (("exp1", [1.0, 0.75, 0.25]), ("exp2", [1.0, 1.0, 0.5])):
        for s in seeds:
            for k, a in zip((1, 2, 3), acc):
                rows.append({"model": model, "metric": "count_acc", "value": a, "k": k, "n": 4, "seed": s})
    return pd.DataFrame(rows)


def test_length_curves_pool_seeds_into_wilson_intervals():
    from interp.clevr.metrics import wilson_interval
    from scorescope.export import length_figure

    fig = length_figure(length_frame(), "count_acc", train_range=(1, 2))
    ax = fig.axes[0]
    assert fig.scorescope["pooled_intervals"]
    bands = [c for c in ax.collections if isinstance(c, matplotlib.collections.PolyCollection)]
    assert len(bands) == 2  # one band per model
    # exp1 at k = 3: 0.25 of 4 images in each of 2 seeds = 2 of 8
    lo, hi = wilson_interval(2, 8)
    verts = bands[0].get_paths()[0].vertices
    at3 = verts[np.isclose(verts[:, 0], 3)][:, 1]
    assert np.isclose(at3, lo).any() and np.isclose(at3, hi).any()
    span = [p for p in ax.patches if p.get_label() == "training range"]
    assert len(span) == 1
    x0 = span[0].get_x()
    assert (x0, x0 + span[0].get_width()) == pytest.approx((0.5, 2.5))


def test_length_curves_without_intervals_use_seaborn_errorbars_over_seeds():
    df = length_frame(seeds=(0, 1, 2))
    df.loc[df.seed == 1, "value"] *= 0.5  # seeds disagree: a band over seeds
    fig = figures.length_curves(df, "count_acc", errorbar=("pi", 100))
    assert not fig.scorescope["pooled_intervals"] and fig.scorescope["seeds"] == 3
    assert any(isinstance(c, matplotlib.collections.PolyCollection) for c in fig.axes[0].collections)
    one = figures.length_curves(length_frame(seeds=(0,)), "count_acc", errorbar=("pi", 100))
    bands = [c for c in one.axes[0].collections if isinstance(c, matplotlib.collections.PolyCollection)]
    assert all(np.ptp(p.vertices[:, 1]) == 0 for b in bands for p in b.get_paths())  # one seed: no spread


def test_plot_dispatches_by_probe():
    cos = ProbeResult("concept_cosines", metadata={"site": "mid.attn2", "t": 0.5, "concepts": ["red", "blue"]})
    cos.maps["cosine"] = torch.tensor([[1.0, -0.2], [-0.2, 1.0]])
    cos.axes["cosine"] = ("concept", "concept")
    fig = cos.plot()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["red", "blue"]
    assert fig.axes[1].get_ylabel() == "cosine similarity of concept directions (unitless)"
    assert fig.axes[0].collections[0].norm.vmin == -1 and fig.axes[0].collections[0].norm.vmax == 1
    fig = pixel_result().plot()
    assert fig.scorescope["scale"] == "log" and len(map_images(fig)) == 6
    fig = signed_result().plot(norm="shared", select={"conditioner": 1})
    assert fig.scorescope["scale"] == "shared" and len(map_images(fig)) == 3
    assert plt.get_fignums() == []  # made without pyplot: nothing registered, nothing to close or show
    empty = ProbeResult("custom", metadata={})
    with pytest.raises(ValueError, match="no map with image axes"):
        empty.plot()


def test_interp_imports_matplotlib_only_inside_figure_functions():
    """Module-level imports of interp.results / interp.figures name no plotting library (checked on the source:
    a subprocess that imports torch costs seconds here), so importing interp never imports matplotlib."""
    import ast
    import inspect

    import interp.results

    for mod in (interp.results, figures):
        tree = ast.parse(inspect.getsource(mod))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in ("matplotlib", "seaborn")], (mod.__name__, names)
