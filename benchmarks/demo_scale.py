"""What the demo's stages cost per step, and the wall time of ``unikd demo`` that follows, at candidate scales.

    python benchmarks/demo_scale.py [--threads 1] [--steps 3] [--sizes 96 128] [--train 1000] [--val 200]
        [--epochs 3 2 2]

At each image size the models of the demo's stages (:func:`unikd.demo.stage_configs`, fresh weights) take
``--steps`` training steps (forward, backward, AdamW, as the trainer runs them) on one batch of digits-det
images, interleaved with the reference: the R18 RetinaNet of ``configs/digits/retinanet_r18_student.yaml`` at
128 px, whose speed ``docs/benchmarks.md`` gives (``REFERENCE_IMAGES_PER_S``, one torch thread beside one other
job). Evaluation costs one ``predict`` per val image and model. The demo's wall time is estimated twice: from
the step times as measured here (on a busy machine, too slow), and scaled by the reference's documented speed
over its speed here. Nothing is trained to convergence: this is about time, not about AP.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from distill_cost import step_fn

from unikd.config import load_config
from unikd.data import CocoDetection, build_digits_det, collate
from unikd.demo import DEMO, Scale, stage_configs
from unikd.detectors import build_detector
from unikd.distill import AbsorbModel, DistillationModel, KnowledgeExtractors, build_distiller
from unikd.distill.teacher_scale import RMS_IMAGES

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_IMAGES_PER_S = 16.8  # docs/benchmarks.md, "Detectors": retinanet_r18_student, train img/s
NUM_CLASSES = 10


def batch(root: Path, size: int, n: int):
    dataset = CocoDetection(root, "train", size)
    return collate([dataset[i % len(dataset)] for i in range(n)])


def stage_models(scale: Scale) -> dict[str, torch.nn.Module]:
    """The trainer's model of each demo stage, in train mode: teacher, ake, none, fitnet, unikd."""
    cfgs = stage_configs(scale, "unused")
    teacher = build_detector(cfgs["teacher"].model, NUM_CLASSES)

    def new_akes() -> KnowledgeExtractors:  # UniKD freezes its own
        return KnowledgeExtractors(cfgs["ake"].ake, len(teacher.feature_strides), teacher.feature_channels[0],
                                   NUM_CLASSES)

    akes = new_akes()
    models = {"teacher": build_detector(cfgs["teacher"].model, NUM_CLASSES).train(),  # this one trains
              "ake": AbsorbModel(teacher, new_akes()).train()}
    for method in ("none", "fitnet", "unikd"):
        cfg = cfgs[f"student_{method}"]
        student = build_detector(cfg.model, NUM_CLASSES)
        distiller = build_distiller(method, cfg.distill, student, teacher, akes.teacher_rms,
                                    akes if method == "unikd" else None)
        models[method] = DistillationModel(student, teacher if distiller else None, distiller).train()
    return models


def predict_fn(model: torch.nn.Module, images):
    return lambda: model.predict(images)


def timed(fn, steps: int) -> float:
    tic = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - tic) / steps


def estimate(scale: Scale, t: dict[str, float]) -> dict[str, float]:
    """Seconds per demo stage from per-batch times ``t`` (train ``X``, predict ``X/eval``)."""
    iters = math.ceil(scale.n_train / scale.batch_size)
    evals = math.ceil(scale.n_val / scale.batch_size)
    rms = math.ceil(min(RMS_IMAGES, scale.n_train) / scale.batch_size) * t["teacher/eval"]  # AKE and FitNet
    return {
        "teacher": scale.teacher_epochs * iters * t["teacher"] + evals * t["teacher/eval"],
        "ake": rms + scale.ake_epochs * iters * t["ake"] + evals * t["ake/eval"],
        "none": scale.student_epochs * iters * t["none"] + evals * t["none/eval"],
        "fitnet": rms + scale.student_epochs * iters * t["fitnet"] + evals * t["none/eval"],
        "unikd": scale.student_epochs * iters * t["unikd"] + evals * t["none/eval"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[DEMO.size])
    parser.add_argument("--train", type=int, default=DEMO.n_train)
    parser.add_argument("--val", type=int, default=DEMO.n_val)
    parser.add_argument("--epochs", type=int, nargs=3, default=[DEMO.teacher_epochs, DEMO.ake_epochs,
                                                                DEMO.student_epochs],
                        metavar=("TEACHER", "AKE", "STUDENT"))
    parser.add_argument("--cache", type=Path, default=ROOT / "cache" / "demo-scale")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ref_cfg = load_config(ROOT / "configs" / "digits" / "retinanet_r18_student.yaml")
    ref_root = build_digits_det(args.cache / "128", n_train=8, n_val=1, size=128)
    ref_images, ref_targets = batch(ref_root, 128, ref_cfg.data.batch_size)
    reference = step_fn(build_detector(ref_cfg.model, NUM_CLASSES).train(), ref_images, ref_targets)
    reference()
    for size in args.sizes:
        scale = Scale(size, args.train, args.val, *args.epochs)
        root = build_digits_det(args.cache / str(size), n_train=8, n_val=1, size=size)
        images, targets = batch(root, size, scale.batch_size)
        models = stage_models(scale)
        fns = {name: step_fn(m, images, targets) for name, m in models.items()}
        fns.update({f"{name}/eval": predict_fn(models[name], images) for name in ("teacher", "ake", "none")})
        for fn in fns.values():
            fn()  # warm-up
        samples: dict[str, list[float]] = {name: [] for name in [*fns, "reference"]}
        for _ in range(args.steps):  # one step of each, round by round
            for name, fn in fns.items():
                samples[name].append(timed(fn, 1))
            samples["reference"].append(timed(reference, 1))
        t = {name: statistics.median(s) for name, s in samples.items()}
        factor = ref_cfg.data.batch_size / REFERENCE_IMAGES_PER_S / t["reference"]
        stages = estimate(scale, t)
        print(f"\n{size} px, batch {scale.batch_size}, {args.threads} thread(s): seconds per batch, median of "
              f"{args.steps}; reference {t['reference']:.3f} s here, {1 / factor:.2f}x its documented time")
        print(" ".join(f"{name} {value:.3f}" for name, value in t.items()))
        print(f"scale {scale}")
        print("stage seconds, as measured / at the reference's documented speed:")
        for name, seconds in stages.items():
            print(f"  {name:8s} {seconds:7.0f} / {seconds * factor:6.0f}")
        total = sum(stages.values())
        print(f"  {'total':8s} {total:7.0f} / {total * factor:6.0f}  ({total * factor / 60:.1f} min)")


if __name__ == "__main__":
    main()
