"""How far a flipped copy of a stored record is from the record of the flipped image (issue 12, item 3): the
measurement asked for before any shortcut that would serve a flipped image from its unflipped record.

    python benchmarks/flip_records.py --teacher T.pt --ake AKE.safetensors [--data DIR] [--images 32]

For each of the first ``--images`` training images, with the trained teacher and AKEs (what ``unikd dump``
computes, :func:`unikd.distill.unikd.teacher_knowledge`):

- *true*: the record of the flipped image, its ``B̂`` the mirror image of the unflipped record's;
- *shortcut*: the unflipped record, its reference points and boxes mirrored (``x → 1 - x``), its queries and
  embeddings kept.

Reported, per AKE: ``D(z_shortcut, z_true)`` (Eq. 8, on the true record's positives) and the relative difference
``‖z_shortcut − z_true‖ / ‖z_true‖``; for the content AKE also how far the mirrored reference points are from the
true ones and how often the positive sets differ. For scale: the same ``D`` and relative difference between the
records of two different images (image i and image i + 1, unflipped), and the student's own ``D`` at the end of
a UniKD training run (``--student-run``: its last logged ``loss_kd_*`` divided by ``λ``). FitNet: the mirrored
feature maps of the image against those of the flipped image, the MSE over the foreground cells in the teacher's
fixed units (FitNet's loss per level, summed over levels) and the relative difference over the image's cells.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from doc_sections import replace_section

from unikd import jobs
from unikd.data import CocoDetection, ImageResize
from unikd.distill import foreground_mask, knowledge_distance, load_ake, teacher_fingerprint
from unikd.distill.common import normalise_targets, query_boxes
from unikd.distill.unikd import teacher_knowledge
from unikd.transformer import HungarianMatcher

ROOT = Path(__file__).resolve().parents[1]


def mirrored(reference: torch.Tensor) -> torch.Tensor:
    """Reference points ``[..., 2]`` or cxcywh boxes ``[..., 4]`` in normalised image coordinates, mirrored."""
    out = reference.clone()
    out[..., 0] = 1 - out[..., 0]
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` (Frobenius)."""
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def unikd_records(teacher, akes, image, target, b_hat):
    pyramid = teacher.extract_features([image])
    return teacher_knowledge(akes, pyramid, [target], ("ct", "pos"), HungarianMatcher(), b_hat), pyramid


@torch.no_grad()
def measure(teacher, akes, dataset: CocoDetection, images: int) -> dict[str, list[float]]:
    """Per image: the shortcut's distances from the true record, and those of the next image's record."""
    out: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        out.setdefault(name, []).append(value)

    cfg = akes.cfg
    records = []
    for index in range(images + 1):
        image, target = dataset.load(index, False, 0)
        flipped_image, flipped_target = dataset.load(index, True, 0)
        gen = torch.Generator().manual_seed(index)
        boxes, gt_index = query_boxes(normalise_targets([target], [tuple(image.shape[-2:])]), cfg.n_queries,
                                      cfg.alpha, cfg.beta, gen)
        plain, pyramid = unikd_records(teacher, akes, image, target, (boxes, gt_index))
        true, flipped_pyramid = unikd_records(teacher, akes, flipped_image, flipped_target,
                                              (mirrored(boxes), gt_index))
        records.append((plain, pyramid, true, flipped_pyramid, flipped_target))
    for (plain, pyramid, true, flipped_pyramid, flipped_target), (other, *_) in zip(records, records[1:]):
        for kind in ("ct", "pos"):
            add(f"D {kind} shortcut", float(knowledge_distance(plain[kind].z, true[kind].z, true[kind].positive)))
            add(f"rel {kind} shortcut", relative(plain[kind].z, true[kind].z))
            add(f"D {kind} other image", float(knowledge_distance(other[kind].z, plain[kind].z, plain[kind].positive)))
            add(f"rel {kind} other image", relative(other[kind].z, plain[kind].z))
        h, w = pyramid.image_sizes[0]
        shift = (mirrored(plain["ct"].queries.reference) - true["ct"].queries.reference).abs()
        add("ct reference px", float((shift * torch.tensor([w, h])).mean()))
        add("ct positives differ", float(not torch.equal(plain["ct"].positive, true["ct"].positive)))
        fitnet_mse, numerator, denominator = 0.0, 0.0, 0.0
        for level, (f, g, stride) in enumerate(zip(pyramid.levels, flipped_pyramid.levels, pyramid.strides)):
            rows, cols = -(-h // stride), -(-w // stride)
            shortcut = f[0, :, :rows, :cols].flip(-1) / akes.teacher_rms[level]
            truth = g[0, :, :rows, :cols] / akes.teacher_rms[level]
            fg = foreground_mask([flipped_target], (rows, cols), stride)[0]
            fitnet_mse += float((shortcut - truth).pow(2).mean(0)[fg].mean()) if fg.any() else 0.0
            numerator += float((shortcut - truth).pow(2).sum())
            denominator += float(truth.pow(2).sum())
        add("fitnet foreground MSE", fitnet_mse)
        add("fitnet rel", (numerator / denominator) ** 0.5)
    return out


def student_distances(run: Path) -> dict[str, float]:
    """The last logged ``loss_kd_ct`` and ``loss_kd_pos`` of a UniKD run, divided by the run's ``λ``: ``D``."""
    distill = torch.load(run / "student.pt", map_location="cpu", weights_only=False)["meta"]["config"]["distill"]
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss_kd_ct" in line][-1]
    return {"ct": last["loss_kd_ct"] / distill["lambda_ct"], "pos": last["loss_kd_pos"] / distill["lambda_pos"],
            "step": last["step"]}


def write(doc: Path, command: str, stats: dict[str, list[float]], student: dict | None, images: int) -> None:
    med = {k: statistics.median(v) for k, v in stats.items()}
    lines = [
        "## A flipped record against the record of the flipped image",
        "",
        f"Command: `{command}`. Trained digits-det R50 RetinaNet teacher and its AKEs, the first {images} training "
        "images (128 px). *Shortcut*: the unflipped record with its reference points and `B̂` mirrored; *true*: the "
        "record of the flipped image with that mirrored `B̂`. Medians over the images.",
        "",
        "| | content AKE | positional AKE |",
        "|---|---|---|",
        f"| D(z shortcut, z true) (Eq. 8) | {med['D ct shortcut']:.3f} | {med['D pos shortcut']:.3f} |",
        f"| ‖z shortcut − z true‖ / ‖z true‖ | {med['rel ct shortcut']:.2f} | {med['rel pos shortcut']:.2f} |",
        f"| for scale: D between the records of two different images | {med['D ct other image']:.3f} | "
        f"{med['D pos other image']:.3f} |",
        f"| for scale: relative difference, two different images | {med['rel ct other image']:.2f} | "
        f"{med['rel pos other image']:.2f} |",
    ]
    if student:
        lines.append(f"| for scale: the UniKD student's own D at the end of its training (step "
                     f"{student['step']}, as logged) | {student['ct']:.3f} | {student['pos']:.3f} |")
    lines += [
        "",
        f"Content queries: the mirrored reference points lie {med['ct reference px']:.1f} px (median of the mean "
        f"over queries) from the true ones; the positive sets differ in {sum(stats['ct positives differ']):.0f} of "
        f"{images} images. FitNet: the mirrored feature maps against the flipped image's, "
        f"{med['fitnet foreground MSE']:.3f} as FitNet's loss (foreground MSE in the teacher's fixed units, summed "
        f"over levels, before its weight), {med['fitnet rel']:.2f} relative over the image's cells.",
    ]
    replace_section(doc, "\n".join(lines) + "\n", title="# Offline distillation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="a trained teacher checkpoint")
    parser.add_argument("--ake", type=Path, required=True, help="its AKEs")
    parser.add_argument("--data", type=Path, help="dataset folder (default: the teacher's)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--student-run", type=Path, help="a finished 'unikd distill --method unikd' run folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "offline.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher, tcfg = jobs.load_detector(args.teacher)
    akes, _ = load_ake(args.ake, teacher_fingerprint(teacher, tcfg.model))
    akes.eval()
    dataset = CocoDetection(args.data or tcfg.data.root, tcfg.data.train_split,
                            ImageResize.from_config(tcfg.data, train=True), hflip=0.5)
    stats = measure(teacher, akes, dataset, args.images)
    student = student_distances(args.student_run) if args.student_run else None
    print(json.dumps({k: statistics.median(v) for k, v in stats.items()}, indent=1))
    write(args.doc, "python benchmarks/flip_records.py " + " ".join(sys.argv[1:]), stats, student, args.images)


if __name__ == "__main__":
    main()
