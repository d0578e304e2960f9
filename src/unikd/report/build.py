"""``unikd report``: ``report.md`` and its figures from finished runs (a teacher, AKEs, students)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..categories import check_categories, checkpoint_categories, dataset_categories
from ..data import CocoDetection, ImageResize
from ..distill import load_ake
from ..errors import UserError
from . import probes
from .runs import Run, Runs, find_runs
from .tables import gains, metrics_table, stages_table

# prefixes of the distillers' loss names in metrics.jsonl
KD_LOSSES = ("loss_kd_", "loss_fitnet", "loss_fgd_", "loss_mgd", "loss_pkd")
IMAGES = {"activation_maps": 2, "sampling_points": 2, "detections": 3}  # val images per figure
MIN_SCORE = 0.3  # the lowest score of a detection drawn


def require_matplotlib() -> None:
    """A UserError that says how to install matplotlib, if it is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("the report's figures need matplotlib: pip install 'unikd[plots]'")


def val_images(dataset: CocoDetection, n: int) -> list[int]:
    """Indices of ``n`` val images to show: the first ones with at least two objects (then any)."""
    busy = [i for i, (boxes, _) in enumerate(dataset.targets) if len(boxes) >= 2][:n]
    return (busy + [i for i in range(len(dataset)) if i not in busy])[:n]


def _pictures(dataset: CocoDetection, indices: list[int]):
    """The samples at ``indices``: images ``[3, H, W]``, targets, and the images as ``[H, W]`` arrays."""
    images, targets = zip(*(dataset[i] for i in indices))
    return list(images), list(targets), [im.mean(0).numpy() for im in images]


def _curves(students: list[Run]) -> list[tuple[str, list[int], list[float], list[float] | None]]:
    """Per student: the steps, the detection loss (the total less the KD terms) and the KD loss (None without)."""
    series = []
    for run in students:
        records = run.records
        kd_keys = sorted({k for r in records for k in r if k.startswith(KD_LOSSES)})
        kd = [sum(r.get(k, 0.0) for k in kd_keys) for r in records]
        series.append((run.label, [r["step"] for r in records], [r["loss"] - v for r, v in zip(records, kd)],
                       kd if kd_keys else None))
    return series


def _figures(runs: Runs, dataset: CocoDetection, out: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw every figure the runs allow; returns ``(caption, file name)`` pairs and notes on those left out."""
    from . import figures  # matplotlib: an optional dependency, checked by require_matplotlib

    made, missing = [], []
    models = runs.models
    if models:
        figures.map_bars([m.label for m in models], [m.metrics for m in models], out / "map.png")
        made.append(("Val AP and AP50 of each model", "map.png"))
    if runs.students:
        figures.training_curves(_curves(runs.students), out / "training_curves.png")
        made.append(("Training curves of the students: the detection loss and the KD loss", "training_curves.png"))

    shown = [r for r in [runs.teacher, runs.student("fitnet"), runs.student("unikd")] if r is not None]
    if runs.teacher is not None and len(shown) > 1:
        images, _, pictures = _pictures(dataset, val_images(dataset, IMAGES["activation_maps"]))
        rows = [(run.label, probes.activation_maps(run.detector, images)) for run in shown]
        figures.activation_grid(pictures, rows, out / "activation_maps.png")
        made.append(("Fig. 1 of the paper: activation maps (channel mean of |F| per FPN level) of the teacher and "
                     "the distilled students on the same val images", "activation_maps.png"))
    else:
        missing.append("Fig. 1 (activation maps) needs the teacher and a FitNet or UniKD student.")

    ake = next((a for a in runs.akes if runs.teacher_of(a) is not None), None)
    if ake is not None:
        akes, _ = load_ake(ake.checkpoint, runs.teacher.fingerprint)
        images, targets, pictures = _pictures(dataset, val_images(dataset, IMAGES["sampling_points"]))
        torch.manual_seed(0)  # B̂ of the positional queries
        queries = probes.sampled_queries(runs.teacher.detector, akes.eval(), images, targets)
        figures.sampling_points(pictures, queries, out / "sampling_points.png")
        made.append(("Fig. 4 of the paper: where the first layer of f_e samples the teacher's features for a few "
                     "content queries (red, dashed: the box the AKE predicts) and positional queries (green: the "
                     "reference box B̂); dot area ∝ attention weight", "sampling_points.png"))
    else:
        missing.append("Fig. 4 (sampling points) needs the AKE run and its teacher's run.")

    compared = [r for r in [runs.student("none"), runs.student("unikd")] if r is not None] or runs.students
    if compared:
        images, targets, pictures = _pictures(dataset, val_images(dataset, IMAGES["detections"]))
        truths = [{k: t[k].numpy() for k in ("boxes", "labels")} for t in targets]
        columns = [(run.label, probes.detections(run.detector, images, MIN_SCORE)) for run in compared]
        names = [dataset.coco.cats[c]["name"] for c in dataset.category_ids]
        figures.detection_grid(pictures, truths, columns, names, out / "detections.png")
        made.append((f"Detections scoring at least {MIN_SCORE} on val images: "
                     f"{', '.join(r.label for r in compared)}", "detections.png"))
    return made, missing


def build_report(paths: list[str | Path], out: str | Path, data_root: str | Path | None = None) -> Runs:
    """Write ``OUT/report.md`` and its PNG figures from the runs in ``paths`` (see :func:`find_runs`), and return
    those runs. The pictures use the val split of ``data_root`` (default: the dataset the models were trained
    on), whose categories must be the runs' (:mod:`unikd.categories`)."""
    require_matplotlib()
    runs = find_runs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = (runs.models + runs.akes)[0].config.data
    dataset = CocoDetection(data_root or first.root, first.val_split, ImageResize.from_config(first, train=False))
    for run in runs.models + runs.akes:
        check_categories(f"run {run.path}", checkpoint_categories(run.meta), dataset_categories(dataset))
    made, missing = _figures(runs, dataset, out)

    lines = ["# unikd report", "", f"Val split of `{dataset.root}` ({len(dataset)} images).", ""]
    if runs.models:
        lines += ["## COCO metrics on val (%)", "", metrics_table(runs.models)]
        lines += [f"- {line}" for line in gains(runs)]
    for ake in runs.akes:
        lines.append(f"- {ake.label} (`{ake.path}`): the content AKE's own detections score "
                     f"{100 * ake.metrics['AP']:.1f} AP")
    lines.append("")
    if runs.stages:
        lines += ["## Stages", "", stages_table(runs.stages)]
    lines += ["## Runs", ""] + [f"- {run.label}: `{run.path}`" for run in runs.models + runs.akes] + [""]
    lines += ["## Figures", ""]
    for caption, name in made:
        lines += [f"{caption}.", "", f"![{name}]({name})", ""]
    lines += [f"Not drawn: {note}" for note in missing]
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    print(f"report written to {path}")
    return runs
