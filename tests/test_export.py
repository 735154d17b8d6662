"""scorescope.export / `scorescope export maps`: files that open, sidecars that round-trip, folders never clobbered."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from interp.io import MARKER  # noqa: E402
from interp.results import ProbeResult  # noqa: E402
from scorescope import export as ex  # noqa: E402
from scorescope.export_cli import app  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def result() -> ProbeResult:
    gen = torch.Generator().manual_seed(0)
    r = ProbeResult("pixel_locality", metadata={"model": "toy", "config_hash": "abc123", "site": "output",
                                                "quantity": "prediction", "levels": [0.5, 0.9], "seeds": [0, 1]})
    g = torch.rand(2, 2, 8, 8, generator=gen)
    g[0, 0, 3, 3] = 1e4  # a swamping self-pixel
    g[1, 1] = 0.0  # exact zeros
    r.maps["G"] = g
    r.axes["G"] = ("t", "pixel", "row", "col")
    r.maps["pixels"] = torch.tensor([[3, 3], [5, 5]])
    r.axes["pixels"] = ("pixel", "row_col")
    return r


def check_pdf(path: Path) -> None:
    blob = path.read_bytes()
    assert blob.startswith(b"%PDF-")
    tail = blob[-1024:]
    assert b"%%EOF" in tail and b"startxref" in tail
    # the xref offset points at the cross-reference table (or stream)
    offset = int(tail.split(b"startxref")[-1].split()[0])
    assert blob[offset:offset + 4] == b"xref" or b"/XRef" in blob[offset:offset + 200]


def test_export_writes_files_that_open_and_sidecars_that_round_trip(tmp_path):
    r = result()
    done = ex.export_maps(r, tmp_path / "out", formats=["pdf", "svg", "png"])
    stem = tmp_path / "out" / "pixel_locality-G"
    assert sorted(p.name for p in done.paths["G"]) == sorted(
        f"pixel_locality-G.{s}" for s in ("pdf", "svg", "png", "safetensors", "json"))
    check_pdf(stem.with_suffix(".pdf"))
    pdf = stem.with_suffix(".pdf").read_bytes()
    assert b"/FontFile2" in pdf and b"/CreationDate" not in pdf  # TrueType (editable) text, no date in the bytes
    root = ET.parse(stem.with_suffix(".svg")).getroot()
    assert root.tag.endswith("svg")
    label = "|∂D_i/∂x_j| summed over channels (prediction units per input unit)"
    # SVG keeps text as text: the colorbar label is searchable in the vector file
    assert label in "".join(root.itertext())
    png = mpimg.imread(stem.with_suffix(".png"))
    fig = done.figures["G"]
    w, h = fig.get_size_inches()
    assert png.shape[1] == pytest.approx(w * 300, abs=2) and png.shape[0] == pytest.approx(h * 300, abs=2)
    arrays = ex.read_arrays(stem.with_suffix(".safetensors"))
    assert torch.equal(arrays["G"], r["G"])
    assert torch.equal(arrays["panels"], r["G"].double().transpose(0, 1))  # pixels on rows, noise levels on columns
    side = json.loads(stem.with_suffix(".json").read_text())
    assert side["colorbar_label"] == label
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"] == [label]
    assert side["colour_scale"]["kind"] == "log"  # auto for pixel-locality maps
    assert side["colour_scale"]["log_floor"] == pytest.approx(1e4 * 1e-4)
    prov = side["provenance"]
    assert {k: prov[k] for k in ("model", "config_hash", "site", "levels", "seeds")} == {
        "model": "toy", "config_hash": "abc123", "site": "output", "levels": [0.5, 0.9], "seeds": [0, 1]}
    assert prov["version"] == r.metadata["version"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(ex.__file__).parent, capture_output=True, text=True)
    if head.returncode == 0:
        assert prov["git_commit"] == head.stdout.strip()
    else:
        assert "git_commit" not in prov
    assert side["axes"] == ["t", "pixel", "row", "col"] and side["panels"]["col_labels"] == ["t = 0.5", "t = 0.9"]


def test_git_commit_is_absent_outside_a_checkout(tmp_path, monkeypatch):
    assert ex.git_commit(tmp_path) is None
    top = Path(ex.__file__).resolve().parent.parent
    # a package that sits deeper inside some other checkout (a venv in a user's repository) reports no commit
    monkeypatch.setattr(ex, "__file__", str(top / "interp" / "clevr" / "export.py"))
    assert ex.git_commit() is None


def test_export_never_replaces_files_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    r = result()
    ex.export_maps(r, out, formats=["png"], dpi=50)
    png = out / "pixel_locality-G.png"
    first = png.read_bytes()
    r.maps["G"] = r["G"] * 2
    ex.export_maps(r, out, formats=["png"], dpi=50)  # re-export of its own files: replaced
    assert torch.equal(ex.read_arrays(out / "pixel_locality-G.safetensors")["G"], r["G"])
    # a file the user made with an export's name, in the export's own folder: refused, named
    (out / "pixel_locality-G.svg").write_text("my drawing")
    with pytest.raises(FileExistsError, match=r"pixel_locality-G\.svg.*--overwrite"):
        ex.export_maps(r, out, formats=["png", "svg"], dpi=50)
    assert (out / "pixel_locality-G.svg").read_text() == "my drawing"
    # an export the user edited since: refused too
    png.write_bytes(first + b"edited")
    with pytest.raises(FileExistsError, match=r"pixel_locality-G\.png"):
        ex.export_maps(r, out, formats=["png"], dpi=50)
    assert png.read_bytes() == first + b"edited"
    # overwrite=True does not change that: the user's drawing and the edited export survive
    with pytest.raises(FileExistsError, match=r"pixel_locality-G\.png, pixel_locality-G\.svg.*even with --overwrite"):
        ex.export_maps(r, out, formats=["png", "svg"], overwrite=True, dpi=50)
    assert (out / "pixel_locality-G.svg").read_text() == "my drawing"
    assert png.read_bytes() == first + b"edited"
    # a link planted under an export's name is refused too, and its target is never written through
    (out / "notes.txt").write_text("keep me")
    (out / "pixel_locality-G.json").unlink()  # the test's own setup: the export's sidecar, replaced by a link
    (out / "pixel_locality-G.json").symlink_to(out / "notes.txt")
    with pytest.raises(FileExistsError, match=r"pixel_locality-G\.json"):
        ex.export_maps(r, out, formats=["png"], overwrite=True, dpi=50)
    assert (out / "pixel_locality-G.json").is_symlink() and (out / "notes.txt").read_text() == "keep me"
    # once the user moves their files away, the export writes again
    for name in ("pixel_locality-G.svg", "pixel_locality-G.png", "pixel_locality-G.json"):
        (out / name).rename(tmp_path / name)
    ex.export_maps(r, out, formats=["png", "svg"], dpi=50)
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "pixel_locality-G.json").read_text())["map"] == "G"
    ET.parse(out / "pixel_locality-G.svg")


def test_a_foreign_folder_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "paper.tex").write_text("\\documentclass{article}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        ex.export_maps(result(), out, formats=["png"], dpi=50)
    assert sorted(p.name for p in out.iterdir()) == ["paper.tex"]
    ex.export_maps(result(), out, formats=["png"], overwrite=True, dpi=50)
    assert (out / "paper.tex").exists() and (out / MARKER).exists()


def test_bad_map_and_format_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"no map\(s\) \['jvp'\]; maps: G, pixels"):
        ex.export_maps(result(), tmp_path / "a", maps=["jvp"])
    with pytest.raises(ValueError, match="subset of pdf, svg, png"):
        ex.export_maps(result(), tmp_path / "a", formats=["eps"])
    assert not (tmp_path / "a").exists()  # refused before the folder was claimed


def test_stack_sites_gives_a_layers_by_noise_grid(tmp_path):
    rs = []
    for i, site in enumerate(["down.attn2", "up.attn2"]):
        r = ProbeResult("feature_dependence", metadata={"site": site, "levels": [0.1, 0.9]})
        r.maps["jvp"] = torch.full((2, 3, 4, 4), float(i + 1))
        r.axes["jvp"] = ("t", "conditioner", "row", "col")
        rs.append(r)
    stacked = ex.stack_sites(rs, "jvp")
    done = ex.export_maps(stacked, tmp_path / "o", maps=["jvp"], formats=["png"], select={"conditioner": 2},
                          dpi=50)
    panels = done.figures["jvp"].scorescope["panels"]
    assert panels.row_labels == ["down.attn2", "up.attn2"] and panels.col_labels == ["t = 0.1", "t = 0.9"]
    assert (tmp_path / "o" / "feature_dependence-jvp-conditioner2.png").exists()
    with pytest.raises(ValueError, match="no map 'ablation'"):
        ex.stack_sites(rs, "ablation")


runner = CliRunner()


@pytest.mark.parametrize("args, option, text", [
    (["--probe", "gradcam"], "--probe", "unknown probe 'gradcam'; use one of pixel, conditional"),
    (["--format", "pdf,eps"], "--format", "subset of pdf, svg, png"),
    (["--t", "0.5,1.5"], "--t", "in [0, 1]"),
    (["--maps", "jvp"], "--maps", "maps: G"),
    (["--norm", "linear"], "--norm", "norm must be one of"),
    (["--width", "a4"], "--width", "one-column, two-column"),
    (["--pixels", "1,2,3"], "--pixels", "row,col"),
    (["--seeds", "0"], "--seeds", "seeds must be >= 1"),
    (["--directions", "some"], "--directions", "'all' or a whole number"),
    (["--model", "exp42"], "--model", "unknown model 'exp42'"),
])
def test_cli_bad_options_exit_2_naming_the_option(tmp_path, args, option, text):
    base = ["maps", "--model", "tiny-clevr", "--probe", "pixel", "--out", str(tmp_path / "o")]
    res = runner.invoke(app, base + args)
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())  # rich's box, unwrapped
    assert f"'{option}'" in out and text in out
    assert not (tmp_path / "o").exists()


def test_cli_exports_a_probe_and_refuses_a_foreign_folder(tmp_path):
    out = tmp_path / "fig"
    args = ["maps", "--model", "tiny-clevr", "--probe", "pixel", "--t", "0.5", "--seeds", "1", "--pixels", "16,16",
            "--format", "png", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert mpimg.imread(out / "pixel_locality-G.png").ndim == 3
    side = json.loads((out / "pixel_locality-G.json").read_text())
    assert side["provenance"]["model"] == "tiny-clevr" and side["provenance"]["levels"] == [0.5]
    assert ex.read_arrays(out / "pixel_locality-G.safetensors")["G"].shape == (1, 1, 32, 32)
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "draft.md").write_text("x")
    res = runner.invoke(app, args[:-1] + [str(foreign)])
    assert res.exit_code == 2 and "'--out'" in res.output
    assert sorted(p.name for p in foreign.iterdir()) == ["draft.md"]


def test_cli_conditional_probe_exports_ablation_maps(tmp_path):
    out = tmp_path / "cond"
    res = runner.invoke(app, ["maps", "--model", "tiny-clevr", "--probe", "conditional", "--maps", "ablation,n_eff_ablation",
                              "--t", "0.5", "--seeds", "1", "--locations", "0.25,0.3;0.7,0.7", "--format", "svg",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    side = json.loads((out / "conditional_locality-ablation.json").read_text())
    assert side["panels"]["rows"] == "conditioner" and len(side["panels"]["row_labels"]) == 2
    assert side["colorbar_label"] == "‖D_i(c) − D_i(c∖j)‖ over channels (prediction units)"
    assert side["colour_scale"]["kind"] == "shared"  # auto for a non-negative map that is not a Jacobian
    assert ex.read_arrays(out / "conditional_locality-n_eff_ablation.safetensors")["n_eff_ablation"].shape == (1, 32, 32)
    ET.parse(out / "conditional_locality-ablation.svg")
