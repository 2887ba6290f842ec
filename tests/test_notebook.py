"""The quickstart notebook runs top to bottom, so it cannot rot."""

from __future__ import annotations

import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # metric@K curves, trade-offs, segments inline
    assert os.path.exists(tmp_path / "report" / "report.html")
    assert os.path.exists(tmp_path / "monitor" / "monitor.html")
    assert os.path.exists(tmp_path / "synthetic" / "interactions.csv")
    assert os.path.exists(tmp_path / "export" / "1" / "assets.extra" / "model_card.html")


def test_notebook_is_valid_and_covers_every_stage():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    source = "\n".join(cell.source for cell in notebook.cells)
    for step in ("build_features", "train(", "export_model", "RecommenderClient",
                 "generate_candidates", "build_baselines", "evaluate(", "write_model_card",
                 "run_monitor", "synthesize("):
        assert step in source
