"""``examples/quickstart.ipynb``, the notebook walkthrough of docs/api.md, runs from top to bottom in a Jupyter
kernel (nbclient), in an empty folder, and its cells show what the text says they show."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def printed(cell: dict) -> str:
    """What the cell printed to stdout."""
    return "".join(o["text"] for o in cell.get("outputs", []) if o.get("name") == "stdout")


def result(cell: dict) -> str:
    """The cell's value, as the notebook shows it."""
    return "".join(o["data"]["text/plain"] for o in cell.get("outputs", []) if o["output_type"] == "execute_result")


def test_the_quickstart_notebook_runs_and_learns(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    problems = printed(code[2]).splitlines()
    assert sorted(p.split(":")[0] for p in problems) == ["augment.policy", "train.lr"], problems
    status = result(code[3])
    assert status.startswith("('success', ") and float(status.strip("()").split(", ")[1]) > 0.5, status
    assert "top_classes" in result(code[5]) and result(code[6]).strip().isdigit()
    assert (tmp_path / "quickstart_runs").is_dir() and list((tmp_path / "quickstart_runs").glob("*/*/report.html"))
