"""The report's tables, as Markdown."""
from __future__ import annotations

from ..evaluation import METRICS
from .runs import Run, Runs


def _percent(value: float) -> str:
    return "–" if value < 0 else f"{100 * value:.1f}"  # COCOeval gives -1 where the split has no such object


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f}"


def metrics_table(models: list[Run]) -> str:
    """One row per model: val AP, AP50, AP75, APs, APm, APl (%) and the trainer's training minutes."""
    lines = ["| model | " + " | ".join(METRICS) + " | train min |", "|---" * (len(METRICS) + 2) + "|"]
    for run in models:
        lines.append(f"| {run.label} | " + " | ".join(_percent(run.metrics[k]) for k in METRICS)
                     + f" | {_minutes(run.train_seconds)} |")
    return "\n".join(lines) + "\n"


def gains(runs: Runs) -> list[str]:
    """Each distilled student's AP minus the student alone's, and the teacher's lead over the student alone."""
    alone = runs.student("none")
    if alone is None:
        return []
    lines = [f"{run.label} − {alone.label}: {100 * (run.metrics['AP'] - alone.metrics['AP']):+.1f} AP"
             for run in runs.students if run is not alone]
    if runs.teacher is not None:
        lines.append(f"{runs.teacher.label} − {alone.label}: "
                     f"{100 * (runs.teacher.metrics['AP'] - alone.metrics['AP']):+.1f} AP")
    return lines


def stages_table(stages: dict[str, dict]) -> str:
    """The demo's stages: command and wall time (all attempts of a resumed stage together)."""
    lines = ["| stage | command | wall min |", "|---|---|---|"]
    for record in stages.values():
        lines.append(f"| {record['title']} | `{record['command']}` | {_minutes(record['seconds'])} |")
    lines.append(f"| all | | {_minutes(sum(r['seconds'] for r in stages.values()))} |")
    return "\n".join(lines) + "\n"
