"""The ```python blocks of README.md and docs/*.md run as written, so the docs cannot drift from the code.

Each page's blocks run in order in one fresh Python process, like a notebook (a later block may use an earlier
one's names). A block marked ``<!-- run: fresh-process -->`` runs alone in a process of its own (it shows what a
new process does: compile, export, checkpoint loading); a block marked ``<!-- no-run: <reason> -->`` is not run
(it needs files, the network or a long time), and the reason is required.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# the BitTTS pages document the example package, whose own tests run its code: only their fresh-process blocks run
_FRESH_ONLY = ("docs/bittts",)
_BLOCK = re.compile(r"(?:<!-- (run: fresh-process|no-run(?::[^>]*)?) -->\s*)?```python\n(.*?)```", re.S)


def blocks(text: str) -> list[tuple[str, str]]:
    """(marker, code) of every ```python block: marker "" (runs with its page), "fresh" or "no-run"."""
    out = []
    for marker, code in _BLOCK.findall(text):
        if marker.startswith("no-run"):
            assert marker.partition(":")[2].strip(), f"a no-run block must say why:\n{code}"
            out.append(("no-run", code))
        else:
            out.append(("fresh" if marker else "", code))
    return out


def _examples() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    pages, fresh = [], []
    for page in PAGES:
        found = blocks(page.read_text())
        name = page.relative_to(ROOT).as_posix()
        together = [code for marker, code in found if marker == ""]
        if together and not name.startswith(_FRESH_ONLY):
            pages.append((name, "\n".join(together)))
        fresh += [(f"{name}-{i}", code) for i, (m, code) in enumerate(found) if m == "fresh"]
    return pages, fresh


PAGE_CODE, FRESH = _examples()


def run(code: str, cwd: Path) -> None:
    if "import peft" in code:
        pytest.importorskip("peft")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, f"the example failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"


def test_the_examples_are_found() -> None:
    assert len(FRESH) >= 5, "the fresh-process examples of docs/conversion.md were not found"
    assert {"README.md", "docs/quickstart.md"} <= {name for name, _ in PAGE_CODE}


def test_a_block_is_run_unless_marked() -> None:
    page = "```python\na = 1\n```\n<!-- no-run: needs a GPU -->\n```python\nb = 2\n```\n" \
           "<!-- run: fresh-process -->\n```python\nc = 3\n```\n"
    assert blocks(page) == [("", "a = 1\n"), ("no-run", "b = 2\n"), ("fresh", "c = 3\n")]
    with pytest.raises(AssertionError, match="must say why"):
        blocks("<!-- no-run -->\n```python\nb = 2\n```\n")


@pytest.mark.parametrize("code", [c for _, c in PAGE_CODE], ids=[n for n, _ in PAGE_CODE])
def test_a_pages_examples_run_in_order(code: str, tmp_path: Path) -> None:
    run(code, tmp_path)  # in an empty folder: the files an example writes go there


@pytest.mark.parametrize("code", [c for _, c in FRESH], ids=[n for n, _ in FRESH])
def test_docs_example_runs_in_a_fresh_process(code: str, tmp_path: Path) -> None:
    run(code, tmp_path)
