"""The docs name tests that exist: every ``file::function`` in docs/*.md is a test."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_the_docs_cite_exists():
    tests = {p.name: p.read_text() for p in (ROOT / "tests").rglob("test_*.py")}
    cited = [(doc.name, f, fn) for doc in (ROOT / "docs").glob("*.md")
             for f, fn in re.findall(r"(test_\w+\.py)::(test_\w+)", doc.read_text())]
    assert cited
    missing = [f"{doc}: {f}::{fn}" for doc, f, fn in cited
               if not re.search(rf"^def {fn}\b", tests.get(f, ""), re.M)]
    assert missing == []
