"""Every test a document names as proof of a claim exists (``path::test`` in docs/*.md and README.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REFERENCE = re.compile(r"`((?:tests|integration)/[\w/]+\.py)(?:::(\w+))?")


def _references() -> list[tuple[str, str, str | None]]:
    found = []
    for doc in DOCS:
        for path, test in REFERENCE.findall(doc.read_text()):
            found.append((doc.name, path, test or None))
    return found


def _functions(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_the_threat_model_names_its_proofs() -> None:
    assert sum(doc == "threat-model.md" for doc, _, _ in _references()) >= 50


@pytest.mark.parametrize(("doc", "path", "test"), _references())
def test_a_named_test_exists(doc: str, path: str, test: str | None) -> None:
    file = ROOT / path
    assert file.is_file(), f"{doc} names {path}, which does not exist"
    if test is not None:
        assert test in _functions(file), f"{doc} names {path}::{test}, which does not exist"
