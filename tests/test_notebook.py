"""notebooks/quickstart.ipynb runs top to bottom as a person runs it — Jupyter's working
directory is the checkout's notebooks/ folder, no environment variables set — on a tiny trained
run in a checkout-like folder: figures shown inline, a DICOM series written; without any trained
run it trains one itself; and it is stored in git without outputs."""

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the [test] extra brings nbformat")
nbclient = pytest.importorskip("nbclient", reason="the [test] extra brings nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
# The run the notebook looks for: where the README's quick command trains.
QUICK_RUN = "runs/deepsr_x8_small_b6"
# Cells up to and including `sr = petsr_jax.load(WORKDIR)`.
LOAD_CELLS = 5


def test_quickstart_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:60]


def _checkout(tmp_path: Path) -> Path:
    """A folder laid out as a checkout: notebooks/quickstart.ipynb and configs/."""
    checkout = tmp_path / "checkout"
    (checkout / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, checkout / "notebooks")
    shutil.copytree(REPO / "configs", checkout / "configs")
    return checkout


def _as_a_person_runs_it(monkeypatch, **env) -> None:
    """The kernel is a fresh Python with one CPU device and matplotlib's inline backend, as a
    person's notebook has, and none of the notebook's environment variables set."""
    for name in ("PETSR_WORKDIR", "PETSR_SCAN", "PETSR_MR_WORKDIR", "PETSR_T1", "PETSR_TRAIN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("MPLBACKEND", "XLA_FLAGS", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _client(notebook, cwd: Path, timeout: int = 180):
    return nbclient.NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )


def _text(notebook) -> str:
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    return "".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", "")) for out in outputs
    )


def test_quickstart_runs_from_the_notebooks_folder_and_finds_the_checkouts_run(
    tiny_deepsr_workdir, tmp_path, monkeypatch
):
    checkout = _checkout(tmp_path)
    shutil.copytree(tiny_deepsr_workdir, checkout / QUICK_RUN)
    _as_a_person_runs_it(monkeypatch)
    notebook = nbformat.read(checkout / "notebooks" / "quickstart.ipynb", as_version=4)
    _client(notebook, checkout / "notebooks").execute()  # raises naming the failing cell

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = _text(notebook)
    assert str(checkout / QUICK_RUN) in text  # found one folder up, as ../runs/...
    assert "No trained run found" not in text
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) == 2, "the comparison and the enhanced scan are shown inline"
    assert "No MR-guided run given" in text
    assert "total " in text and "max " in text  # the activity change is printed
    assert "wrote 8 DICOM files" in text


def test_quickstart_trains_a_run_where_none_is_found(tmp_path, monkeypatch):
    checkout = _checkout(tmp_path)
    _as_a_person_runs_it(monkeypatch, PETSR_TRAIN="tiny")  # the quick model takes minutes
    notebook = nbformat.read(checkout / "notebooks" / "quickstart.ipynb", as_version=4)
    client = _client(notebook, checkout / "notebooks", timeout=300)
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells[:LOAD_CELLS]):
            client.execute_cell(cell, index)

    trained = checkout / "runs" / "deepsr_x8_tiny_b2"
    text = _text(notebook)
    assert f"No trained run found: training DeepSR 8x (tiny) into {trained}" in text
    assert (trained / "results.json").is_file(), "a finished run, in the checkout's runs/"
    assert f"SuperResolver(deepsr, scale=8, workdir='{trained}')" in text  # then loaded
