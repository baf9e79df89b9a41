"""Re-run lessons top to bottom and write their outputs back into the notebooks.

    python lessons/refresh.py                    every lesson
    python lessons/refresh.py 02 04              only lessons whose file name starts with 02 or 04

The lessons are committed with their outputs (text, tables and figures), so that they read fully on a
code host before anyone runs them. Those outputs must be what the code in the notebook and in minivit
produces: whoever changes a lesson, or minivit code a lesson shows, runs this and commits the result.
It runs each notebook in its default mode (not the tests' fast mode: MINIVIT_LESSONS_FAST is removed
from the environment) in a fresh kernel with the working directory lessons/, fails on the first error
without touching that notebook, and prints each lesson's run time and size.
tests/test_lessons.py checks that every committed notebook was executed top to bottom in one run
without an error, and re-executes each in fast mode.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

LESSONS = Path(__file__).resolve().parent
MAX_BYTES = 2_000_000          # a lesson well under 2 MB: figures as PNG at a modest resolution


def notebooks(prefixes):
    found = sorted(LESSONS.glob("[0-9]*.ipynb"))
    if prefixes:
        found = [p for p in found if any(p.name.startswith(prefix) for prefix in prefixes)]
        if not found:
            sys.exit(f"no lesson in {LESSONS} starts with {' or '.join(prefixes)}")
    return found


def refresh(path: Path) -> tuple[float, int]:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(LESSONS)}}).execute()
    seconds = time.perf_counter() - start
    for cell in nb.cells:                        # keep diffs free of timestamps
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    text = nbformat.writes(nb) + "\n"
    if len(text.encode()) > MAX_BYTES:
        raise SystemExit(f"{path.name}: {len(text.encode()):,} bytes with outputs, more than {MAX_BYTES:,}; "
                         f"make its figures smaller")
    tmp = path.with_suffix(".ipynb.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)                        # atomic: a failed run never leaves half a notebook
    return seconds, len(text.encode())


def main(argv):
    os.environ.pop("MINIVIT_LESSONS_FAST", None)
    for path in notebooks(argv):
        print(f"{path.name}: running ...", flush=True)
        seconds, size = refresh(path)
        print(f"{path.name}: {seconds:.0f} s, {size / 1e3:.0f} kB written", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
