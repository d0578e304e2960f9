"""``unikd demo``: the main job end to end on digits-det, with a report, at a scale for 2 CPU cores.

Stages, each but the first and the last one ``unikd`` job in its own folder of ``OUT``:

1. ``digits-det``: the dataset, built once into ``--data``;
2. ``teacher``: an R18 Faster R-CNN with a 128-channel FPN (``unikd train``; docs/results.md says why not R50);
3. ``ake``: the AKEs on the frozen teacher (``unikd pretrain-ake``);
4. to 6. ``student_none``, ``student_fitnet``, ``student_unikd``: the R18 FCOS student alone, with
   FitNet and with UniKD (``unikd distill --method ...``);
7. ``report``: ``OUT/report/report.md`` and its figures (``unikd report OUT``).

Each job runs from the config it wrote to ``OUT/STAGE/config.yaml``, so the command in ``OUT/demo.json``
and in the report reproduces it exactly. A stage whose last file exists is skipped; one that left a
checkpoint continues from it; a stage folder made with another config is refused, never mixed.
"""
from __future__ import annotations

import importlib.metadata
import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import config as C
from .errors import UserError

METHODS = ("none", "fitnet", "unikd")


@dataclass(frozen=True)
class Scale:
    """How much the demo does: the digits-det build and each stage's epochs over its train split."""

    size: int
    n_train: int
    n_val: int
    teacher_epochs: int
    ake_epochs: int
    student_epochs: int
    batch_size: int = 8
    small_models: bool = False  # 32-channel FPNs and a small AKE (the smoke run)
    min_side: int = 12  # digits-det: the smallest digit's side in px, and the most digits per image
    max_digits: int = 6


# The demo's scale: docs/results.md ("The demo's scale") gives the step times and the estimate behind it.
DEMO = Scale(size=96, n_train=800, n_val=200, teacher_epochs=4, ake_epochs=4, student_epochs=4)
QUICK = Scale(size=64, n_train=8, n_val=4, teacher_epochs=1, ake_epochs=1, student_epochs=1, batch_size=4,
              small_models=True)

# Settings by role, as dotted config keys, from the digits-det configs (configs/digits/); a shorter warm-up for the
# shorter schedules (25 iterations of 400; the configs: 100 of 750).
SCHEDULE = {"train.optimizer": "adamw", "train.lr": 1e-3, "train.warmup_iters": 25, "train.log_every": 10}
TEACHER = {
    "name": "demo-teacher-faster_rcnn-r18", "model.family": "faster_rcnn", "model.backbone": "resnet18",
    "model.fpn_channels": 128, "model.anchor_sizes": [8, 16, 32, 64, 128],
    "model.rpn_pre_nms_top_n": 300, "model.rpn_post_nms_top_n": 100,
    "model.rpn_batch_size_per_image": 128,
    "model.box_batch_size_per_image": 64,  # configs: 128; a cheaper step, and digits-det images hold ≤ 6 objects
}
AKE = {"name": "demo-ake", "ake.d_model": 128, "ake.n_queries": 100, "ake.d_ffn": 512, "train.lr": 4e-4,
       "train.grad_clip": 0.1}
STUDENT = {
    "model.family": "fcos", "model.backbone": "resnet18", "model.fpn_channels": 64,
    "model.anchor_sizes": [4, 8, 16, 32, 64],  # configs/digits/fcos_r18_student.yaml
    "distill.lambda_ct": 0.5, "distill.lambda_pos": 0.5, "distill.fitnet_weight": 0.2,
}
SMALL = {  # scale.small_models
    "teacher": {"model.fpn_channels": 32, "model.rpn_pre_nms_top_n": 100, "model.rpn_post_nms_top_n": 50},
    "ake": {"ake.d_model": 32, "ake.n_queries": 10, "ake.n_heads": 4, "ake.n_points": 2, "ake.d_ffn": 64},
    "student": {"model.fpn_channels": 32},
}


def _config(*layers: dict[str, Any]) -> C.ExperimentConfig:
    """The defaults with each layer's dotted keys set in turn, validated."""
    values = C.to_dict(C.ExperimentConfig())
    for layer in layers:
        for key, value in layer.items():
            *sections, last = key.split(".")
            node = values
            for section in sections:
                node = node[section]
            node[last] = value
    return C.from_dict(values)


def stage_configs(scale: Scale, data_root: str | Path, seed: int = 0) -> dict[str, C.ExperimentConfig]:
    """The configs of the training stages: ``teacher``, ``ake`` and ``student_METHOD`` for each method."""
    common = {"data.root": str(data_root), "data.size": scale.size, "data.batch_size": scale.batch_size,
              "train.seed": seed, **SCHEDULE}
    small = SMALL if scale.small_models else {"teacher": {}, "ake": {}, "student": {}}
    configs = {
        "teacher": _config(common, TEACHER, small["teacher"], {"train.epochs": scale.teacher_epochs}),
        "ake": _config(common, AKE, small["ake"], {"train.epochs": scale.ake_epochs}),
    }
    for method in METHODS:
        configs[f"student_{method}"] = _config(
            common, STUDENT, small["student"],
            {"name": f"demo-student-{method}", "distill.method": method, "train.epochs": scale.student_epochs})
    return configs


@dataclass
class Stage:
    """One step of the demo: ``run(resume)`` does it; ``done`` is the file it writes last. A training stage
    without a checkpoint to resume starts afresh (``--overwrite``) in its folder, which the demo claimed by
    its ``config.yaml``: what an attempt killed before its first checkpoint left there is the demo's own."""

    name: str
    title: str
    command: list[str]
    folder: Path
    done: Path
    run: Callable[[Path | None], Any]
    config: C.ExperimentConfig | None = None  # a training job's, written to FOLDER/config.yaml


def _digits_stage(data_root: Path, scale: Scale) -> Stage:
    """Stage 1. ``meta.json`` marks a complete build; one of other parameters or of another Pillow is refused, never
    overwritten (the demo's later stages were trained on it)."""
    from .data import build_digits_det

    meta = data_root / "meta.json"
    wanted = {"n_train": scale.n_train, "n_val": scale.n_val, "size": scale.size, "seed": 0,
              "min_side": scale.min_side, "max_digits": scale.max_digits}
    old = {"min_side": 12, "max_digits": 6}  # builds from before the keys
    built = json.loads(meta.read_text()) if meta.exists() else None
    if built is not None and {k: built.get(k, old.get(k)) for k in wanted} != wanted:
        raise UserError(f"{data_root} holds a digits-det build with other parameters than the demo's {wanted} "
                        f"({meta}); give the demo another --data")
    pillow = importlib.metadata.version("pillow")
    if built is not None and built.get("pillow") != pillow:
        raise UserError(f"{data_root} holds a digits-det build made with Pillow {built.get('pillow', '(unknown)')}, "
                        f"not this environment's {pillow} (versions can draw its images differently: docs/data.md, "
                        "\"Same bytes\"); remove it and the demo's runs made on it, or give the demo another --data")
    command = ["unikd", "data", "build", "digits-det", "--out", str(data_root), "--train", str(scale.n_train),
               "--val", str(scale.n_val), "--size", str(scale.size), "--min-side", str(scale.min_side),
               "--max-digits", str(scale.max_digits)]
    return Stage("digits-det", f"digits-det ({scale.n_train} train / {scale.n_val} val images of {scale.size} px, "
                 f"1-{scale.max_digits} digits of {scale.min_side} px or more)", command, data_root, meta,
                 run=lambda _: build_digits_det(data_root, n_train=scale.n_train, n_val=scale.n_val, size=scale.size,
                                                min_side=scale.min_side, max_digits=scale.max_digits))


def plan(out: Path, data_root: Path, scale: Scale, seed: int = 0) -> list[Stage]:
    """The demo's stages in order (see the module docstring), but the report."""
    from . import jobs

    configs = stage_configs(scale, data_root, seed)
    teacher = out / "teacher" / "last.pt"
    ake = out / "ake" / "ake.safetensors"

    def job(name: str, title: str, command: list[str], done: str, fn: Callable) -> Stage:
        folder = out / name
        cfg_path = folder / "config.yaml"
        command = ["unikd", command[0], str(cfg_path), *command[1:], "--out", str(folder)]
        return Stage(name, title, command, folder, folder / done, config=configs[name],
                     run=lambda resume: fn(C.load_config(cfg_path), folder, resume, resume is None))

    stages = [_digits_stage(data_root, scale),
              job("teacher", "teacher: R18 Faster R-CNN (128-channel FPN)", ["train"], "eval.json",
                  jobs.train_detector),
              job("ake", "AKE pretraining (UniKD stage 1)", ["pretrain-ake", "--teacher", str(teacher)], "report.json",
                  lambda cfg, folder, resume, fresh: jobs.pretrain_ake(cfg, teacher, folder, resume, fresh))]
    titles = {"none": "R18 FCOS student alone", "fitnet": "R18 FCOS student with FitNet",
              "unikd": "R18 FCOS student with UniKD (stage 2)"}
    for method in METHODS:
        ake_args = ["--ake", str(ake)] if method == "unikd" else []
        stages.append(job(f"student_{method}", titles[method],
                          ["distill", "--teacher", str(teacher), *ake_args, "--method", method], "student.pt",
                          lambda cfg, folder, resume, fresh, a=ake if ake_args else None: jobs.distill(
                              cfg, teacher, folder, a, resume, fresh)))
    return stages


def _claim(stage: Stage) -> None:
    """Write the stage's config, or check that the one already in its folder is the same."""
    path = stage.folder / "config.yaml"
    text = yaml.safe_dump(C.to_dict(stage.config), sort_keys=False)
    if path.exists() and path.read_text() != text:
        raise UserError(f"{stage.folder} holds a run made with another config ({path}); remove the folder or "
                        "give the demo another --out")
    if not path.exists() and (stage.folder / "last.pt").exists():
        raise UserError(f"{stage.folder} holds a run the demo did not make; remove it or give another --out")
    stage.folder.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@dataclass
class Record:
    """What ``OUT/demo.json`` keeps of each stage: its command and the wall seconds of all its attempts."""

    title: str
    command: str
    folder: str
    seconds: float = 0.0
    finished: bool = False


@dataclass
class Journal:
    """``OUT/demo.json``: the scale, the seed and a :class:`Record` per stage, rewritten after every attempt."""

    path: Path
    scale: dict
    seed: int
    stages: dict[str, Record] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, scale: Scale, seed: int) -> Journal:
        """The journal in ``path`` (a new one if there is none); one of another scale or seed is refused."""
        journal = cls(path, asdict(scale), seed)
        if path.exists():
            old = json.loads(path.read_text())
            if (old["scale"], old["seed"]) != (journal.scale, seed):
                raise UserError(f"{path.parent} holds a demo of another scale or seed ({path}); give the demo "
                                "another --out")
            journal.stages = {k: Record(**v) for k, v in old["stages"].items()}
        return journal

    def save(self) -> None:
        data = {"scale": self.scale, "seed": self.seed, "stages": {k: asdict(v) for k, v in self.stages.items()}}
        self.path.write_text(json.dumps(data, indent=2) + "\n")


def run_stage(stage: Stage, journal: Journal) -> bool:
    """Skip ``stage`` if finished, else run it (continuing from its checkpoint). Returns whether it ran."""
    record = journal.stages.setdefault(stage.name, Record(stage.title, shlex.join(stage.command), str(stage.folder)))
    if stage.config is not None:
        _claim(stage)
    if stage.done.exists():
        print(f"  done already ({stage.done}), skipped", flush=True)
        record.finished = True
        journal.save()
        return False
    resume = stage.folder / "last.pt" if stage.config is not None else None
    resume = resume if resume is not None and resume.exists() else None
    if resume is not None:
        print(f"  continuing from {resume}", flush=True)
    print(f"  $ {record.command}{' --resume' if resume else ''}", flush=True)
    tic = time.perf_counter()
    try:
        stage.run(resume)
    finally:
        record.seconds += time.perf_counter() - tic
        record.finished = stage.done.exists()
        journal.save()
    return True


def run_demo(out: str | Path | None = None, data_root: str | Path | None = None, quick: bool = False,
             seed: int = 0, threads: int = 0) -> dict[str, dict]:
    """Every stage in turn, then the report; prints the table and returns the val metrics by model.

    ``out`` and ``data_root`` default to ``runs/demo`` and ``cache/digits-det-demo`` (with ``quick``: ``-quick``
    added, so the two never meet). ``threads``: torch threads for all stages (0: torch's default); not part of
    the configs, as it changes the speed only.
    """
    import torch

    from .report import build_report, find_runs, require_matplotlib
    from .report.tables import metrics_table

    require_matplotlib()  # before minutes of training, not after
    if threads:
        torch.set_num_threads(threads)
    suffix = "-quick" if quick else ""
    out = Path(out or f"runs/demo{suffix}")
    data_root = Path(data_root or f"cache/digits-det-demo{suffix}")
    scale = QUICK if quick else DEMO
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal.open(out / "demo.json", scale, seed)
    stages = plan(out, data_root, scale, seed)
    total = len(stages) + 1
    ran = False
    for i, stage in enumerate(stages, 1):
        print(f"stage {i}/{total}: {stage.title}", flush=True)
        ran = run_stage(stage, journal) or ran
    print(f"stage {total}/{total}: report", flush=True)
    report = out / "report"
    if ran or not (report / "report.md").exists():
        tic = time.perf_counter()
        runs = build_report([out], report)
        journal.stages["report"] = Record("report", shlex.join(["unikd", "report", str(out), "--out", str(report)]),
                                          str(report), time.perf_counter() - tic, True)
        journal.save()
    else:
        print(f"  done already ({report / 'report.md'}), skipped", flush=True)
        runs = find_runs([out])
    print("\ndigits-det val (COCO AP, %):\n" + metrics_table(runs.models) + f"\nreport: {report / 'report.md'}")
    return {run.label: run.metrics for run in runs.models}
