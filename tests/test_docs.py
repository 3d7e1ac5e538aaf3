"""The docs stay true to the tree: every relative link in every Markdown file resolves to a file (and
heading) inside the repository. External links (http:, https:, mailto:) are not followed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _markdown_files() -> list[Path]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "*.md"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.split()
    return [REPO / f for f in out if (REPO / f).is_file()]


def _prose_lines(path: Path):
    """(line number, text) of the lines outside fenced code blocks, inline code removed."""
    fenced = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield n, re.sub(r"`[^`]*`", "", line)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(text.lstrip("#")) for _, text in _prose_lines(path) if text.startswith("#")}


def broken_links(files: list[Path]) -> list[str]:
    bad = []
    for md in files:
        for n, line in _prose_lines(md):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue  # external
                path, _, fragment = target.partition("#")
                dest = (md.parent / path).resolve() if path else md
                where = f"{md.relative_to(REPO)}:{n}: {target}"
                if not dest.is_relative_to(REPO):
                    bad.append(f"{where} points outside the repository")
                elif not dest.exists():
                    bad.append(f"{where} does not exist")
                elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
                    bad.append(f"{where} names no heading of {dest.name}")
    return bad


def test_every_relative_link_in_the_docs_resolves_inside_the_repository():
    files = _markdown_files()
    assert len(files) >= 5  # README, docs/, the service READMEs
    assert broken_links(files) == []


def test_the_link_check_catches_a_missing_file_a_missing_heading_and_an_escape(tmp_path):
    md = REPO / "docs" / "architecture.md"
    assert broken_links([md]) == []
    fake = REPO / "docs" / ".link-check-probe.md"
    fake.write_text("[a](nowhere.md) [b](architecture.md#no-such-heading) [c](../../outside.md) "
                    "[d](https://example.org) `[e](ignored.md)`\n")
    try:
        found = broken_links([fake])
    finally:
        fake.unlink()
    assert [line.split(": ", 1)[1] for line in found] == [
        "nowhere.md does not exist",
        "architecture.md#no-such-heading names no heading of architecture.md",
        "../../outside.md points outside the repository",
    ]
