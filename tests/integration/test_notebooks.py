"""The worked examples in notebooks/ run top to bottom (tiny settings via GEN_AD_NB_TINY=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

# the dev extra installs both; a machine without them (a GPU box without registry access) skips
nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (the dev extra)")
NotebookClient = pytest.importorskip(
    "nbclient", reason="nbclient is not installed (the dev extra)").NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ["01_quickstart", "02_anomaly_maps", "03_knn_baseline", "04_cell_toxicology"]


def test_notebooks_are_stored_without_outputs() -> None:
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), name
        # worked examples import gen_ad and define no library code
        assert not any(line.startswith(("def ", "class ")) for c in code
                       for line in c.source.splitlines()), name


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEN_AD_NB_TINY", "1")
    monkeypatch.setenv("GEN_AD_NB_OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # kernel "python3" runs with this interpreter (jupyter_client maps "python" to it)
    NotebookClient(nb, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} displayed no figure"
    assert (tmp_path / name).is_dir()
