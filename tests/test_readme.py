"""README.md names tests as evidence (the Reliability table): every test it names must exist.

A name is written `test_file.py::test_name`, or `::test_name` for another test of the file named
just before it on the same line or paragraph.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tests_in(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_readme_names_exists():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    named, current = [], None
    for file, name in re.findall(r"(test_\w+\.py)?::(test_\w+)", text):
        current = file or current
        assert current is not None, f"README names ::{name} before naming its file"
        named.append((current, name))
    assert len(named) >= 30, "the Reliability table names its tests"
    missing = [f"{file}::{name}" for file, name in named if name not in _tests_in(REPO / "tests" / file)]
    assert not missing, f"README.md names tests that do not exist: {missing}"
