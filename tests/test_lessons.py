"""The lessons (lessons/*.ipynb): committed executed, and they still run top to bottom.

Each notebook asserts its own claims (shapes, gradient-check errors below 1e-6, a planted bug
caught, the loss going down), so executing it is the test. The notebooks are committed *with*
their outputs and figures, so that they read fully on a code host; `python lessons/refresh.py`
re-runs them in their default mode and writes the outputs back. Here:

* every committed notebook was executed top to bottom in one run (execution counts 1, 2, 3, ...),
  with no error in any output, and is under 2 MB;
* it opens with what it teaches, its prerequisites, its run time and the paper section it covers,
  and shows at least one figure;
* re-executed now in fast mode (MINIVIT_LESSONS_FAST=1: fewer images and steps, the same code
  paths; MINIVIT_LESSONS_FAST=0 runs the default mode instead), no cell fails.

Execution needs Jupyter's nbclient and ipykernel (`pip install -e ".[lessons]"`): without them the
execution tests are skipped, unless CI or MINIVIT_REQUIRE_REFERENCE is set (as by .ci/run), which
turns the skip into a failure.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

LESSONS = Path(__file__).resolve().parents[1] / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("[0-9]*.ipynb"))
MAX_BYTES = 2_000_000


def _require(name):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("CI") or os.environ.get("MINIVIT_REQUIRE_REFERENCE"):
            pytest.fail(f"{name!r} is needed to run the lessons (CI or MINIVIT_REQUIRE_REFERENCE is set) but: {exc}")
        pytest.skip(f"{name} not installed (pip install -e '.[lessons]')")


def _cells(path, kind):
    return [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == kind]


def _text(cell):
    return "".join(cell["source"])


def test_there_are_lessons():
    names = [p.name for p in NOTEBOOKS]
    assert len(NOTEBOOKS) >= 5, f"expected at least 5 notebooks in {LESSONS}, found {names}"
    numbers = [int(n[:2]) for n in names]
    assert numbers[:5] == [1, 2, 3, 4, 5] and len(set(numbers)) == len(numbers), names   # one lesson per number


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lesson_is_committed_executed_top_to_bottom(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size:,} bytes, keep it under 2 MB"
    code = _cells(path, "code")
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts}: the outputs must come from one run top to bottom; "
        f"refresh them with `python lessons/refresh.py {path.name[:2]}`")
    errors = [i for i, c in enumerate(code) for out in c.get("outputs", []) if out["output_type"] == "error"]
    assert not errors, f"{path.name}: code cells {errors} show an error"
    assert any(c.get("outputs") for c in code), f"{path.name}: no outputs at all"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lesson_opens_with_what_when_how_long_and_shows_figures(path):
    opening = _text(_cells(path, "markdown")[0]).lower()
    for needed in ("you will learn", "prerequisites", "run time", "paper"):
        assert needed in opening, f"{path.name}: the first cell must say {needed!r}"
    figures = [out for c in _cells(path, "code") for out in c.get("outputs", [])
               if "image/png" in out.get("data", {})]
    assert figures, f"{path.name}: no figure in the committed outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lesson_runs(path, monkeypatch):
    nbformat = _require("nbformat")
    nbclient = _require("nbclient")
    _require("ipykernel")
    if os.environ.get("MINIVIT_LESSONS_FAST") != "0":
        monkeypatch.setenv("MINIVIT_LESSONS_FAST", "1")     # the kernel inherits this environment
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(LESSONS)}})
    client.execute()   # raises CellExecutionError, naming the cell and its traceback, if any cell fails
