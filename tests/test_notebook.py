"""notebooks/quickstart.ipynb runs top to bottom, as a person runs it, on a tiny trained run:
figures shown inline, a DICOM series written, and stored in git without outputs."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the [test] extra brings nbformat")
nbclient = pytest.importorskip("nbclient", reason="the [test] extra brings nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_quickstart_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:60]


def test_quickstart_runs_top_to_bottom(tiny_deepsr_workdir, monkeypatch):
    monkeypatch.setenv("PETSR_WORKDIR", str(tiny_deepsr_workdir))
    for name in ("PETSR_SCAN", "PETSR_MR_WORKDIR", "PETSR_T1"):
        monkeypatch.delenv(name, raising=False)
    # The kernel is a fresh Python with one CPU device and matplotlib's inline backend, as a
    # person's notebook has.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) == 2, "the comparison and the enhanced scan are shown inline"
    assert "No MR-guided run given" in text
    assert "total " in text and "max " in text  # the activity change is printed
    assert "wrote 8 DICOM files" in text
