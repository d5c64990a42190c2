"""Every notebook executes top to bottom (a failing cell fails the test), from a fresh copy without its stored
outputs; the stored outputs (``make notebooks``) hold the figures as PNG images and keep each file small."""
import base64
import copy
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
MAX_BYTES = 2_500_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _outputs(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _cleared(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` with every stored output and execution count removed."""
    fresh = copy.deepcopy(nb)
    for c in fresh.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    return fresh


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path):
    nb = _cleared(nbformat.read(path, as_version=4))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for o in _outputs(nb) if o.output_type == "error"]
    assert not errors


def test_there_are_notebooks():
    assert any(p.name.startswith("01_parallel_directions") for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_notebook_shows_png_figures_and_is_small(path):
    """The stored outputs (``make notebooks``) hold each notebook's figures as PNG images, what a code host renders,
    with no inlined plotly.js, and the file stays under 2.5 MB."""
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    data = [o.get("data", {}) for o in _outputs(nbformat.read(path, as_version=4))]
    pngs = [base64.b64decode(d["image/png"]) for d in data if "image/png" in d]
    assert pngs, f"{path.name}: no stored image/png output; run `make notebooks`"
    assert all(p.startswith(PNG_MAGIC) for p in pngs)
    assert not [d for d in data if "plotly.js v" in d.get("text/html", "")]
