"""Shared by the benchmark scripts: put a generated ``## Heading`` section into a markdown file."""
from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, section: str, title: str = "# Benchmarks") -> None:
    """Write ``section`` (which starts with its ``## `` heading line) into ``path`` in place of the section
    with the same heading, or append it; the file's other sections are left alone."""
    heading = section.splitlines()[0].rstrip()
    lines = path.read_text().splitlines(keepends=True) if path.exists() else [title + "\n"]
    starts = [i for i, line in enumerate(lines) if line.rstrip() == heading]
    if starts:
        begin = starts[0]
        end = next((i for i in range(begin + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = ["\n", *lines[end:]] if end < len(lines) else []
        lines = [*lines[:begin], section, *tail]
    else:
        lines = [*lines, "\n", section]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
