"""Finished ``unikd`` runs, found in folders and told apart by the files each job writes last.

- ``unikd distill``: ``student.pt`` (a student; its ``distill.method`` names it);
- ``unikd pretrain-ake``: ``ake.safetensors`` and ``report.json`` (the AKEs);
- ``unikd train``: ``eval.json`` and ``last.pt`` (a detector; *the teacher* when the students or the AKEs were
  trained with its weights).

A folder that is none of these but holds such runs stands for them (``unikd report runs/demo``); a
``demo.json`` beside them (written by ``unikd demo``) gives each stage's command and wall time.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .. import config as C
from ..engine.checkpoint import load_checkpoint
from ..errors import UserError

LABELS = {"none": "student alone", "fitnet": "FitNet", "unikd": "UniKD"}
METHOD_ORDER = ("none", "fitnet", "unikd")


@dataclass
class Run:
    """One finished run.

    Attributes:
        path: its folder.
        kind: ``"detector"`` (unikd train), ``"ake"`` (unikd pretrain-ake) or ``"student"`` (unikd distill).
        config: the config it ran with.
        meta: its checkpoint's ``meta`` (``teacher`` holds the teacher's fingerprint for AKEs and students).
        metrics: val COCO metrics in [0, 1] (the AKEs: the content AKE's own detections).
        label: its name in tables and figures.
    """

    path: Path
    kind: str
    config: C.ExperimentConfig
    meta: dict
    metrics: dict[str, float]
    label: str = ""

    @property
    def checkpoint(self) -> Path:
        """The detector weights (``student.pt``, ``last.pt``) or the AKE file."""
        return self.path / {"student": "student.pt", "ake": "ake.safetensors", "detector": "last.pt"}[self.kind]

    @property
    def method(self) -> str | None:
        return self.config.distill.method if self.kind == "student" else None

    @cached_property
    def records(self) -> list[dict]:
        """The training records of ``metrics.jsonl`` in step order, one per step (evaluations left out; where
        an interrupted run logged a step again after resuming, the later record counts)."""
        path = self.path / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        by_step = {r["step"]: r for r in map(json.loads, lines) if "eval" not in r}
        return [by_step[s] for s in sorted(by_step)]

    @property
    def train_seconds(self) -> float | None:
        """The trainer's clock of its training iterations."""
        return self.records[-1]["train_seconds"] if self.records else None

    @cached_property
    def detector(self):
        """The trained detector (eval mode, CPU), for detectors and students."""
        from ..jobs import load_detector

        return load_detector(self.checkpoint)[0]

    @cached_property
    def fingerprint(self) -> dict:
        """Its weights' fingerprint, as the AKEs and students it taught record it (detectors only)."""
        from ..distill import teacher_fingerprint

        return teacher_fingerprint(self.detector, self.config.model)


@dataclass
class Runs:
    """The runs of one report: ``teacher`` (None when no student or AKE names one of the detectors), the other
    ``detectors``, the ``students`` (student alone, FitNet, UniKD, then any other method) and the ``akes``;
    ``stages``: the demo's records by stage name (``demo.json``), if any."""

    teacher: Run | None = None
    detectors: list[Run] = field(default_factory=list)
    students: list[Run] = field(default_factory=list)
    akes: list[Run] = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)

    @property
    def models(self) -> list[Run]:
        """Every detector, the teacher first and the students last: the rows of the metrics table."""
        return ([self.teacher] if self.teacher else []) + self.detectors + self.students

    def student(self, method: str) -> Run | None:
        return next((s for s in self.students if s.method == method), None)

    def teacher_of(self, run: Run) -> Run | None:
        """The teacher whose weights ``run`` (AKEs or a student) was trained with, if among these runs."""
        if self.teacher is not None and run.meta.get("teacher") == self.teacher.fingerprint:
            return self.teacher
        return None


def _is_run(path: Path) -> bool:
    return any((path / f).exists() for f in ("student.pt", "ake.safetensors", "eval.json"))


def load_run(path: Path) -> Run:
    """The finished run in ``path``; a UserError if there is none."""
    if (path / "student.pt").exists():
        kind, ckpt, metrics = "student", path / "student.pt", path / "eval.json"
    elif (path / "ake.safetensors").exists():
        kind, ckpt, metrics = "ake", path / "last.pt", path / "report.json"
    elif (path / "eval.json").exists() and (path / "last.pt").exists():
        kind, ckpt, metrics = "detector", path / "last.pt", path / "eval.json"
    else:
        raise UserError(f"{path} holds no finished unikd run (no student.pt, ake.safetensors or eval.json with "
                        "last.pt)")
    meta = load_checkpoint(ckpt)["meta"]
    values = json.loads(metrics.read_text())
    return Run(path, kind, C.from_dict(meta["config"]), meta, values["ake_val"] if kind == "ake" else values)


def find_runs(paths: list[str | Path]) -> Runs:
    """The runs in ``paths``: each a run folder, or a folder of run folders (with its ``demo.json``, if any)."""
    found: list[Run] = []
    runs = Runs()
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"run folder not found: {path}")
        if _is_run(path):
            found.append(load_run(path))
            continue
        inner = sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p))
        if not inner:
            raise UserError(f"{path} holds no finished unikd run, nor folders of them")
        found += [load_run(p) for p in inner]
        if (path / "demo.json").exists():
            runs.stages.update(json.loads((path / "demo.json").read_text())["stages"])
    detectors = [r for r in found if r.kind == "detector"]
    taught = [r for r in found if r.kind != "detector"]
    for run in detectors:
        if any(t.meta.get("teacher") == run.fingerprint for t in taught) and runs.teacher is None:
            runs.teacher = run
        else:
            runs.detectors.append(run)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    runs.students = sorted((r for r in found if r.kind == "student"),
                           key=lambda r: (order.get(r.method, len(order)), r.method, str(r.path)))
    runs.akes = [r for r in found if r.kind == "ake"]
    _label(runs)
    return runs


def _label(runs: Runs) -> None:
    """Names for tables and figures; runs that would share one get their folder name added."""
    if runs.teacher:
        runs.teacher.label = "teacher"
    for run in runs.detectors:
        run.label = run.config.name
    for run in runs.students:
        run.label = LABELS.get(run.method, run.method)
    for run in runs.akes:
        run.label = "AKE"
    everything = runs.models + runs.akes
    counts = Counter(run.label for run in everything)
    for run in everything:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.path.name})"
