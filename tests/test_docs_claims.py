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


def test_the_firewall_doc_and_the_readme_name_their_proofs() -> None:
    assert sum(doc == "firewall.md" and test is not None for doc, _, test in _references()) >= 8
    assert "docs/claims.md" in (ROOT / "README.md").read_text() or "docs/threat-model.md" in (
        ROOT / "README.md").read_text()


def test_every_claim_row_names_a_test() -> None:
    """In docs/claims.md every table row (a claim) names at least one existing test."""
    rows = [line for line in (ROOT / "docs" / "claims.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| claim ") and not set(line) <= set("|- ")]
    assert len(rows) >= 40, len(rows)
    bare = [row for row in rows if not any(test for _, test in REFERENCE.findall(row))]
    assert not bare, f"claims without a test: {bare}"


def test_every_proof_in_the_threat_model_and_firewall_doc_is_in_the_claims_table() -> None:
    table = {(path, test) for doc, path, test in _references() if doc == "claims.md"}
    named = {(path, test) for doc, path, test in _references() if doc == "firewall.md" and test}
    assert named <= table, sorted(named - table)


@pytest.mark.parametrize(("doc", "path", "test"), _references())
def test_a_named_test_exists(doc: str, path: str, test: str | None) -> None:
    file = ROOT / path
    assert file.is_file(), f"{doc} names {path}, which does not exist"
    if test is not None:
        assert test in _functions(file), f"{doc} names {path}::{test}, which does not exist"
