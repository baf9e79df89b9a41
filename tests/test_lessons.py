"""The lessons (lessons/*.ipynb) run top to bottom without an error.

Each notebook asserts its own claims (shapes, gradient-check errors below 1e-6, a planted bug
caught, the loss going down), so executing it is the test. They need Jupyter's nbclient and
ipykernel (`pip install -e ".[lessons]"`): without them the execution tests are skipped, unless
CI or MINIVIT_REQUIRE_REFERENCE is set (as by .ci/run), which turns the skip into a failure.
The notebooks are stored without outputs, so the repository stays small and diffs stay readable.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

LESSONS = Path(__file__).resolve().parents[1] / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("*.ipynb"))


def _require(name):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("CI") or os.environ.get("MINIVIT_REQUIRE_REFERENCE"):
            pytest.fail(f"{name!r} is needed to run the lessons (CI or MINIVIT_REQUIRE_REFERENCE is set) but: {exc}")
        pytest.skip(f"{name} not installed (pip install -e '.[lessons]')")


def test_there_are_lessons():
    assert len(NOTEBOOKS) >= 4, f"expected at least 4 notebooks in {LESSONS}, found {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lesson_is_stored_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    dirty = [i for i, cell in enumerate(nb["cells"])
             if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have outputs; clear them before committing "
                       f"(jupyter nbconvert --clear-output --inplace {path.relative_to(LESSONS.parent)})")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lesson_runs(path):
    nbformat = _require("nbformat")
    nbclient = _require("nbclient")
    _require("ipykernel")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(LESSONS)}})
    client.execute()   # raises CellExecutionError, naming the cell and its traceback, if any cell fails
