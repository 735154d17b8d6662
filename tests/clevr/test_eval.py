"""The length-generalisation evaluation end to end on a tiny model, and its input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from interp.clevr.evaluate import evaluate_length, parse_counts, request_sets
from interp.clevr.render import MIN_SEPARATION
from interp.models.clevr import clevr_pipeline


def test_cli_eval_writes_table_figure_and_grid(tmp_path):
    from scorescope.cli import app

    out = tmp_path / "ev" / "out.json"
    res = CliRunner().invoke(app, ["clevr", "eval", "--model", "tiny-clevr", "--counts", "0,2,4", "--n", "3", "--steps", "2", "--seed", "0", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [r["k"] for r in data["per_k"]] == [0, 2, 4]
    for r in data["per_k"]:
        assert {"k", "n", "count_acc", "recall", "precision", "placement_acc", "mean_count"} <= set(r)
        assert 0 <= r["placement_acc"] <= 1
        assert r["n"] == 3 and 0 <= r["count_acc"] <= 1 and r["mean_count"] >= 0
        assert sum(r["error_hist"].values()) == 3
    for png in ("out_accuracy.png", "out_samples.png"):
        assert (out.parent / png).read_bytes()[:4] == b"\x89PNG"


def test_evaluation_is_seeded():
    pipe = clevr_pipeline("tiny", seed=0)
    a = evaluate_length(pipe, [1, 3], n=2, steps=2, seed=5)
    b = evaluate_length(pipe, [1, 3], n=2, steps=2, seed=5)
    assert json.dumps(a["per_k"]) == json.dumps(b["per_k"])  # NaN-safe comparison
    assert (a["_images"] == b["_images"]).all()


def test_request_sets_are_valid_and_seeded():
    s1, s2 = request_sets(10, 5, 0), request_sets(10, 5, 0)
    assert all(np.array_equal(x, y) for x, y in zip(s1, s2))
    for s in s1:
        d = np.linalg.norm(s[:, None] - s[None], axis=-1) + np.eye(10) * 9
        assert s.shape == (10, 2) and d.min() >= MIN_SEPARATION - 1e-6


def test_bad_requests_raise_clear_errors():
    with pytest.raises(ValueError, match="outside 0…10"):
        parse_counts("0-11")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_counts("a-b")
    pipe = clevr_pipeline("tiny", seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe.conditioning([[0.5, -0.1]])
    with pytest.raises(ValueError, match="n must be"):
        evaluate_length(pipe, [1], n=0)
    from interp.clevr.cli import app

    res = CliRunner().invoke(app, ["eval", "--model", "exp42", "--n", "1"])
    assert res.exit_code == 2 and "'--model'" in res.output and "unknown model 'exp42'" in res.output
    res = CliRunner().invoke(app, ["eval", "--model", "tiny-clevr", "--counts", "12"])
    assert res.exit_code == 2 and "'--counts'" in res.output and "maximum" in res.output


def test_cli_compare_plots_several_results_and_rejects_bad_input(tmp_path):
    from scorescope.cli import app

    pipe = clevr_pipeline("tiny", seed=0)
    paths = []
    for name, seed in (("a", 0), ("b", 1)):
        res = evaluate_length(pipe, [1, 2], n=2, steps=2, seed=seed, model_name=name)
        res.pop("_images")
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(res))
    out = tmp_path / "cmp.png"
    res = CliRunner().invoke(app, ["clevr", "compare", *map(str, paths), "--metric", "mean_extra", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    res = CliRunner().invoke(app, ["clevr", "compare", str(paths[0]), "--metric", "accuracy"])
    assert res.exit_code != 0 and "mean_extra" in res.output  # names the metrics that exist
    res = CliRunner().invoke(app, ["clevr", "compare", str(tmp_path / "missing.json")])
    assert res.exit_code != 0 and "clevr eval" in res.output


def test_batch_units_and_parts_give_the_numbers_of_whole_k_sampling(tmp_path):
    """Each (k, batch) unit alone, through part files and after a resume, gives what sampling all of k at once gives."""
    from interp.clevr.detect import detect
    from interp.clevr.evaluate import OptionError, generate
    from interp.clevr.metrics import count_stats

    pipe = clevr_pipeline("tiny", seed=0)
    kw = dict(n=5, steps=2, seed=5, batch_size=2, keep_images=3)
    mem = evaluate_length(pipe, [1, 3], **kw)
    for row, k in zip(mem["per_k"], [1, 3]):  # the evaluation as it was before units: one generate + detect per k
        req = request_sets(k, 5, 5)
        imgs = generate(pipe, req, seed=5 * 1000 + k, steps=2, batch_size=2)
        assert json.dumps(row) == json.dumps(count_stats(k, req, detect(imgs).positions).as_dict())
    lines: list[str] = []
    on_disk = evaluate_length(pipe, [1, 3], parts=tmp_path / "p", progress=lines.append, **kw)
    assert len(lines) == 6 and json.dumps(on_disk["per_k"]) == json.dumps(mem["per_k"])
    assert (on_disk["_images"] == mem["_images"]).all()
    (tmp_path / "p" / "k03_b000002.safetensors").unlink()  # an interrupted run: one unit missing
    lines.clear()
    again = evaluate_length(pipe, [1, 3], parts=tmp_path / "p", progress=lines.append, **kw)
    assert lines == ["done k=3 scenes 2…"] and json.dumps(again["per_k"]) == json.dumps(mem["per_k"])
    with pytest.raises(OptionError, match=r"'n': \(5, 4\)") as err:
        evaluate_length(pipe, [1, 3], parts=tmp_path / "p", **dict(kw, n=4))
    assert err.value.option == "--parts"


def test_parts_keep_the_colours_read_for_colour_models(tmp_path):
    from interp.clevr.train import build_pipeline, get_recipe

    pipe = build_pipeline(get_recipe("colour"), seed=0)
    kw = dict(n=3, steps=1, seed=2, batch_size=2, keep_images=1)
    mem = evaluate_length(pipe, [2], **kw)
    on_disk = evaluate_length(pipe, [2], parts=tmp_path / "p", **kw)
    assert "colour_acc" in mem["per_k"][0] and json.dumps(on_disk["per_k"]) == json.dumps(mem["per_k"])
