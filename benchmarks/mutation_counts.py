"""Mutation counts per file from mutmut's ``mutants/`` folder, written as the "## Mutation counts" section of
docs/testing.md (``make mutation`` runs it after ``mutmut run``).

    python benchmarks/mutation_counts.py [--command "make mutation"] [--doc docs/testing.md] [--mutants mutants]

A row counts the mutants of that file that mutmut has a result for; files whose mutants were not run (a run
restricted with ``MUTANTS=...``) are named under the table, which is then marked partial. ``s/mutant`` is the
mean wall time of one mutant's test run, as mutmut measured it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
from collections import Counter
from pathlib import Path

from doc_sections import replace_section
from mutmut.stats import status_by_exit_code

COLUMNS = ["killed", "survived", "timeout", "no tests"]


def file_counts(meta: Path) -> tuple[Counter, list[float], int]:
    """Status counts of the run mutants of one ``<file>.py.meta``, their durations, and the unrun count."""
    data = json.loads(meta.read_text())
    counts: Counter = Counter()
    unrun = 0
    for exit_code in data["exit_code_by_key"].values():
        if exit_code is None:
            unrun += 1
        else:
            status = status_by_exit_code[exit_code]
            counts[status if status in COLUMNS else "other"] += 1
    durations = [d for key, d in data.get("durations_by_key", {}).items()
                 if data["exit_code_by_key"].get(key) is not None]
    return counts, durations, unrun


def section(mutants: Path, command: str) -> str:
    rows, not_run, all_durations = [], [], []
    total: Counter = Counter()
    for meta in sorted(mutants.glob("src/**/*.py.meta")):
        source = meta.relative_to(mutants).as_posix().removesuffix(".meta")
        counts, durations, unrun = file_counts(meta)
        if unrun:
            not_run.append(f"{source} ({unrun} of {unrun + sum(counts.values())} mutants)")
        if not counts:
            continue
        total += counts
        all_durations += durations
        mean = f"{statistics.mean(durations):.2f}" if durations else ""
        rows.append([source, sum(counts.values()), *(counts[c] for c in COLUMNS), counts["other"], mean])
    mean = f"{statistics.mean(all_durations):.2f}" if all_durations else ""
    rows.append(["**total**", sum(total.values()), *(total[c] for c in COLUMNS), total["other"], mean])

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["## Mutation counts", "",
             f"`{command}` on {datetime.date.today()} (commit {commit or 'unknown'}); regenerate with "
             "`python benchmarks/mutation_counts.py --command '...'`.", ""]
    if not_run:
        lines += ["**Partial**: mutants not run in: " + ", ".join(not_run) + ".", ""]
    header = ["file", "mutants", *COLUMNS, "other", "s/mutant"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--command", default="make mutation", help="the command that produced the results")
    parser.add_argument("--doc", type=Path, default=Path("docs/testing.md"))
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    args = parser.parse_args()
    if not any(args.mutants.glob("src/**/*.py.meta")):
        raise SystemExit(f"no mutmut results under {args.mutants}/: run `make mutation` first")
    text = section(args.mutants, args.command)
    print(text)
    replace_section(args.doc, text, title="# Testing")


if __name__ == "__main__":
    main()
