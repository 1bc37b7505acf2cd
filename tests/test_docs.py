"""The Python examples in README.md and docs/ run, except those marked `<!-- skip-test: reason -->` (Hub, servers)."""

import glob
import os
import re

import pytest


ROOT = os.path.join(os.path.dirname(__file__), "..")
FILES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
BLOCK = re.compile(r"(<!-- skip-test: [^>]*-->\s*)?```python\n(.*?)```", re.DOTALL)


def blocks():
    for path in FILES:
        with open(path) as handle:
            text = handle.read()
        for number, match in enumerate(BLOCK.finditer(text), start=1):
            name = f"{os.path.relpath(path, ROOT)}#{number}"
            marks = [pytest.mark.skip(reason=match.group(1).strip())] if match.group(1) else []
            yield pytest.param(match.group(2), id=name, marks=marks)


def test_every_document_has_been_scanned():
    assert len(list(blocks())) >= 8


@pytest.mark.parametrize("code", blocks())
def test_doc_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_example__"}
    exec(compile(code, "<doc example>", "exec"), namespace)
