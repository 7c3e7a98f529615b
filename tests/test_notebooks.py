"""The notebooks in notebooks/ are saved without outputs and run from top to bottom."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

NEEDS: dict[str, pytest.MarkDecorator] = {}
MARKS = {"kafka_etl.ipynb": [pytest.mark.kafka]}


def notebooks():
    """Each notebook, marked with what it needs to run."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        marks = [*MARKS.get(path.name, []), *([NEEDS[path.name]] if path.name in NEEDS else [])]
        yield pytest.param(path, id=path.stem, marks=marks)


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} >= {
        "quickstart.ipynb", "kafka_etl.ipynb", "windows.ipynb"}


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_saved_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: clear the outputs before saving"
            assert cell.execution_count is None, f"{path.name}: clear the execution counts"


@pytest.mark.parametrize("path", list(notebooks()))
def test_runs_from_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.monotonic()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}")
    elapsed = time.monotonic() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    stderr = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs if o.get("name") == "stderr")
    # the kernel's own notices (e.g. "[IPKernelApp] WARNING | ... without encryption")
    stderr = "\n".join(line for line in stderr.splitlines()
                       if not line.startswith("[IPKernelApp]"))
    assert "Traceback" not in stderr, stderr
    assert "Warning" not in stderr, stderr
    assert elapsed < 60, f"{path.name} took {elapsed:.0f} s; keep notebooks quick"
