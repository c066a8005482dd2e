"""The docs' examples marked ``<!-- run: fresh-process -->`` run as written, each in a fresh Python process."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
_BLOCK = re.compile(r"<!-- run: fresh-process -->\s*```python\n(.*?)```", re.S)


def _examples() -> list[tuple[str, str]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for i, code in enumerate(_BLOCK.findall(page.read_text())):
            found.append((f"{page.stem}-{i}", code))
    return found


EXAMPLES = _examples()


def test_the_marked_examples_are_found() -> None:
    assert len(EXAMPLES) >= 5, "the fresh-process examples of docs/conversion.md were not found"


@pytest.mark.parametrize("code", [c for _, c in EXAMPLES], ids=[n for n, _ in EXAMPLES])
def test_docs_example_runs_in_a_fresh_process(code: str) -> None:
    if "import peft" in code:
        pytest.importorskip("peft")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the example failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"
