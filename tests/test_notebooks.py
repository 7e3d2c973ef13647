"""Every notebook in notebooks/ runs top to bottom, and is committed with its outputs stripped.

Each notebook runs in a fresh kernel, in a temporary directory, against the test
session's catalog (``LAZYSKY_CATALOG_DSN``). New notebooks are picked up by the glob.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from lazysky.catalog import Catalog

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    names = [p.name for p in NOTEBOOKS]
    assert "01-quickstart.ipynb" in names
    assert "02-interactive-reprocessing.ipynb" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for k, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {k} has outputs (strip them)"
            assert cell.execution_count is None, f"{path.name}: cell {k} has a count"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, catalog: Catalog,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("LAZYSKY_CATALOG_DSN", catalog.dsn)
    monkeypatch.setenv("LAZYSKY_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    src = Path(__file__).parents[1] / "src"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(src), *filter(None, [os.environ.get("PYTHONPATH")])]))
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
