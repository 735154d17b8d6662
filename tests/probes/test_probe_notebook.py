"""The layer-wise locality sweep notebook runs top to bottom on CPU (tiny random CLEVR model)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "layerwise_locality_sweep.ipynb"


def test_layerwise_locality_sweep_notebook_runs(monkeypatch):
    monkeypatch.setenv("SCORESCOPE_MODEL", "tiny-clevr")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "rows from 24 units" in text  # 8 sites x 3 noise levels x 1 seed
