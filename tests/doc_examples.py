"""The code blocks of README.md and docs/*.md, for the tests that run them (test_readme.py, test_docs.py).

A block belongs to the nearest heading above it. A ```python block is either run by a test registered with
:func:`runs` for its (file, heading), or marked as not runnable by the line right before its opening fence,
``<!-- not run: <reason> -->``; ``test_docs.py`` checks that every block is one or the other.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```(\w*)\s*$")
_HEADING = re.compile(r"^(#{1,6}) +(.*?)\s*#*\s*$")
_NOT_RUN = re.compile(r"^<!-- not run: (.+\S) -->$")

#: (file relative to the repository, heading) -> name of the test that runs the section's python blocks
RUNNERS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Block:
    doc: str  # the file, relative to the repository root
    heading: str  # the nearest heading above the block, as written (without the #s)
    line: int  # line of the opening fence, from 1
    language: str
    code: str
    not_run: str | None  # the reason given in <!-- not run: reason -->, if any

    def compile(self):
        return compile(self.code, f"{self.doc}:{self.line + 1}", "exec")


def headings(path: Path) -> list[str]:
    """The headings of a Markdown file, outside code blocks, in order."""
    found, fenced = [], False
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (match := _HEADING.match(line)):
            found.append(match.group(2))
    return found


def code_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    doc = path.relative_to(ROOT).as_posix()
    blocks, heading, start, language = [], "", None, ""
    for number, line in enumerate(lines, start=1):
        fence = _FENCE.match(line)
        if start is None:
            if fence:
                start, language = number, fence.group(1)
            elif match := _HEADING.match(line):
                heading = match.group(2)
            continue
        if fence and not fence.group(1):
            marker = _NOT_RUN.match(lines[start - 2].strip()) if start >= 2 else None
            code = "\n".join(lines[start : number - 1]) + "\n"
            blocks.append(Block(doc, heading, start, language, code, marker.group(1) if marker else None))
            start = None
    assert start is None, f"{doc}:{start}: a code block is not closed"
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in DOC_FILES for block in code_blocks(path)]


def python_blocks(doc: str, heading: str) -> list[Block]:
    """The runnable ```python blocks of ``doc`` under ``heading``."""
    found = [
        b for b in code_blocks(ROOT / doc) if b.heading == heading and b.language == "python" and b.not_run is None
    ]
    assert found, f"{doc} has no runnable python block under the heading {heading!r}"
    return found


def runs(doc: str, heading: str) -> Callable:
    """Register the decorated test as the one that runs the python blocks of ``doc`` under ``heading``."""

    def register(test: Callable) -> Callable:
        assert (doc, heading) not in RUNNERS, f"{doc} / {heading} already has a runner"
        RUNNERS[(doc, heading)] = test.__name__
        return test

    return register


def run(blocks: list[Block], namespace: dict) -> dict:
    """Execute the blocks in order in ``namespace`` (the names they take from their context) and return it."""
    for block in blocks:
        exec(block.compile(), namespace)
    return namespace


def run_printing(block: Block, namespace: dict) -> str:
    """Execute one block and check that it prints what the comments of its print lines say."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(block.compile(), namespace)
    prints = [line for line in block.code.splitlines() if line.lstrip().startswith("print(")]
    assert prints and all("#" in line for line in prints), f"{block.doc}:{block.line}: every print needs its output"
    expected = [line.split("#", 1)[1].strip() for line in prints]
    assert out.getvalue().splitlines() == expected
    return out.getvalue()


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation (but ``-`` and ``_``) dropped, spaces to ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every ``#anchor`` of a Markdown file (repeated headings get ``-1``, ``-2``, ... as on GitHub)."""
    seen: dict[str, int] = {}
    result = set()
    for heading in headings(path):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result
