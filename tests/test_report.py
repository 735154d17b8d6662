"""scorescope.report: one list of blocks, a Markdown file that links figures and an HTML page that embeds them."""

from __future__ import annotations

import base64

import pandas as pd
import pytest

from scorescope.report import Report

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_markdown_links_and_html_embeds_escaping_text(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(PNG)
    rep = Report("title <1>")
    rep.heading("numbers")
    rep.text("**recall** is `0.96` <script>")
    rep.table(pd.DataFrame({"model": ["exp1"], "recall": [0.9567], "lo": [float("nan")]}))
    rep.figure(tmp_path / "figures" / "a.png", "a figure")
    md_path, html_path = rep.write(tmp_path)
    md, page = md_path.read_text(), html_path.read_text()
    assert "![a figure](figures/a.png)" in md and "| exp1 | 0.96 | – |" in md
    assert base64.b64encode(PNG).decode() in page and "figures/a.png" not in page
    assert "<strong>recall</strong> is <code>0.96</code> &lt;script&gt;" in page and "<script>" not in page
    assert "<title>title &lt;1&gt;</title>" in page


def test_a_missing_figure_is_refused_before_anything_is_written(tmp_path):
    rep = Report("t")
    rep.figure("figures/none.png", "missing")
    with pytest.raises(FileNotFoundError, match="none.png"):
        rep.write(tmp_path)
    assert list(tmp_path.iterdir()) == []
