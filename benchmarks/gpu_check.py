"""The GPU path in a few steps at COCO size: teacher training, stage 1, stage 2 (FitNet and UniKD) with AMP.

    python benchmarks/gpu_check.py [--steps 5] [--json gpu_check.json] [--doc docs/benchmarks.md]
    python benchmarks/gpu_check.py --from-json gpu_check.json --doc docs/benchmarks.md   # rebuild the section

Every variant is the trainer's own model and step (``Trainer._train_step``: autocast fp16, GradScaler,
gradient clipping, the optimiser and the schedule) on one batch of two synthetic images, one landscape and one
portrait, 800 × 1333 (the paper's resize), with five boxes each; weights are freshly initialised (a cost and a
code path do not depend on their values). The teachers are the paper's R50 RetinaNet and Faster R-CNN (256-channel
FPN), the student an R18 RetinaNet, the AKEs the paper's (C = 256, N = 200, 1 layer in ``f_e``).

For each variant it reports:
- **AMP against fp32** on the first batch: the losses of one forward pass under autocast fp16 against those of
  the same weights, batch and random draws in fp32; each must agree within ``--rtol`` (relative) + ``--atol``;
- **finite losses** in every AMP training step;
- **host–device syncs** per step, counted with ``torch.cuda.set_sync_debug_mode("warn")``, apart for the
  model's forward + backward and for the whole trainer step (the GradScaler reads its inf check once per step),
  each with the source lines that synchronised;
- **step time** (median over ``--steps`` timed steps after a warm-up) and **peak memory**
  (``torch.cuda.max_memory_allocated``), and the UniKD / FitNet step ratio per teacher.

On a CPU (``--device cpu``, a smoke run of the same code at a small ``--short``/``--long``) the AMP comparison
uses bfloat16 autocast, syncs are not counted and the trainer runs in fp32, as it does on a CPU.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from doc_sections import replace_section

from unikd.config import AKEConfig, DetectorConfig, DistillConfig, TrainConfig
from unikd.detectors import build_detector
from unikd.distill import AbsorbModel, DistillationModel, KnowledgeExtractors, build_distiller
from unikd.distill.adaptor import Adaptor
from unikd.distill.common import B_HAT
from unikd.engine.trainer import Trainer
from unikd.knowledge.seeded_boxes import seeded_query_boxes

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 80
TEACHERS = ("retinanet", "faster_rcnn")
# mmdetection's RetinaNet anchors (octave base scale 4 × strides 8..128); FCOS-style families ignore them.
ANCHORS = [32, 64, 128, 256, 512]
AKES = AKEConfig(d_model=256, n_queries=200)  # the paper's C and N


def variants() -> list[str]:
    """``student``, then ``teacher:F``, ``stage1:F``, ``fitnet:F``, ``fitnet2:F`` (FitNet with UniKD's
    two-layer φ), ``unikd:F`` for each teacher family F."""
    return ["student"] + [f"{kind}:{fam}" for fam in TEACHERS
                          for kind in ("teacher", "stage1", "fitnet", "fitnet2", "unikd")]


def detector(family: str, backbone: str):
    cfg = DetectorConfig(family=family, backbone=backbone, fpn_channels=256, anchor_sizes=ANCHORS)
    return build_detector(cfg, NUM_CLASSES)


def build(variant: str) -> torch.nn.Module:
    """The trainer's model of ``variant``, freshly initialised."""
    kind, _, fam = variant.partition(":")
    if kind == "student":
        return DistillationModel(detector("retinanet", "resnet18"), None, None)
    teacher = detector(fam, "resnet50")
    if kind == "teacher":
        return teacher
    akes = KnowledgeExtractors(AKES, len(teacher.feature_strides),
                               teacher.feature_channels[0], NUM_CLASSES)
    if kind == "stage1":
        return AbsorbModel(teacher, akes)
    student = detector("retinanet", "resnet18")
    cfg = DistillConfig(method="fitnet", adaptor_layers=2) if kind == "fitnet2" else DistillConfig(method=kind)
    distiller = build_distiller(cfg.method, cfg, student, teacher, akes.teacher_rms,
                                akes if kind == "unikd" else None)
    return DistillationModel(student, teacher, distiller)


def synthetic_batch(short: int, long: int, seed: int = 0) -> list[tuple[torch.Tensor, dict]]:
    """Two (image [3, H, W] in [0, 1], target) samples, ``short`` × ``long`` and ``long`` × ``short``, each with
    five boxes (xyxy pixels) drawn as bright rectangles on noise."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for h, w in ((short, long), (long, short)):
        image = 0.2 * torch.rand(3, h, w, generator=g)
        wh = torch.rand(5, 2, generator=g) * torch.tensor([w, h]) * 0.3 + 16
        xy = torch.rand(5, 2, generator=g) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        for x0, y0, x1, y1 in boxes.round().int().tolist():
            image[:, y0:y1, x0:x1] += 0.6
        target = {"boxes": boxes, "labels": torch.randint(0, NUM_CLASSES, (5,), generator=g),
                  "image_id": len(samples)}
        samples.append((image.clamp(0, 1), target))
    return samples


def with_query_boxes(samples: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """The samples with the ``B̂`` (N = 200) that the training data loader draws for them in epoch 0
    (:mod:`unikd.knowledge.seeded_boxes`), as stage 1 and online UniKD receive them."""
    out = []
    for image, target in samples:
        boxes, gt_index = seeded_query_boxes(target, tuple(image.shape[-2:]), (target["image_id"], False, None),
                                             AKES.n_queries, AKES.alpha, AKES.beta, seed=0, draw=0)
        out.append((image, {**target, B_HAT[0]: boxes, B_HAT[1]: gt_index}))
    return out


def collate(samples):
    return [s[0] for s in samples], [s[1] for s in samples]


def to_device(images, targets, device):
    return ([im.to(device) for im in images],
            [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def counting_syncs(device: torch.device, counter: collections.Counter):
    """Count the host–device syncs inside the block by their source line (CUDA only; nothing on a CPU)."""
    if device.type != "cuda":
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            counter[f"{source_name(w.filename)}:{w.lineno}"] += 1


def source_name(filename: str) -> str:
    """``unikd/...`` for the project's own files, the bare file name for torch's and torchvision's."""
    parts = Path(filename).parts
    return "/".join(parts[len(parts) - parts[::-1].index("unikd") - 1:]) if "unikd" in parts else Path(filename).name


def losses_of(model, images, targets, autocast_dtype: torch.dtype | None, device) -> dict[str, float]:
    """One forward pass's losses, with the global RNG (``B̂``, samplers) seeded the same way every time."""
    torch.manual_seed(0)
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                         enabled=autocast_dtype is not None):
        out = model(images, targets)
    losses = out[0] if isinstance(out, tuple) else out
    return {k: float(v) for k, v in losses.items()}


def amp_against_fp32(model, images, targets, device, rtol: float, atol: float) -> dict:
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    fp32 = losses_of(model, images, targets, None, device)
    amp = losses_of(model, images, targets, amp_dtype, device)
    worst = max(abs(amp[k] - fp32[k]) / (atol + rtol * abs(fp32[k])) for k in fp32)
    return {"dtype": str(amp_dtype).removeprefix("torch."), "fp32": fp32, "amp": amp,
            "ok": worst <= 1 and all(math.isfinite(v) for v in amp.values()), "worst_over_tolerance": worst}


def check_variant(variant: str, args, device: torch.device, samples) -> dict:
    torch.manual_seed(0)
    model = build(variant)
    if variant.partition(":")[0] in ("stage1", "unikd"):
        samples = with_query_boxes(samples)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(epochs=1, optimizer="adamw", lr=1e-4, warmup_iters=0, amp=True, device=str(device))
        trainer = Trainer(model, samples, collate, cfg, batch_size=len(samples), out_dir=tmp, device=device)
        model = trainer.model.train()
        images, targets = to_device(*collate(samples), device)
        result = {"amp_vs_fp32": amp_against_fp32(model, images, targets, device, args.rtol, args.atol)}
        forward_syncs, step_syncs = collections.Counter(), collections.Counter()
        times, finite = [], True
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.steps + 1):
            torch.manual_seed(i)
            synchronize(device)
            tic = time.perf_counter()
            if i == 1:  # after the warm-up: the forward + backward alone, then the trainer's whole step
                with counting_syncs(device, forward_syncs), torch.autocast(device.type, dtype=torch.float16,
                                                                           enabled=trainer.amp):
                    out = model(images, targets)
                    loss = sum((out[0] if isinstance(out, tuple) else out).values())
                with counting_syncs(device, forward_syncs):
                    trainer.scaler.scale(loss).backward()
                model.zero_grad(set_to_none=True)
                synchronize(device)
                tic = time.perf_counter()
                with counting_syncs(device, step_syncs):
                    losses = trainer._train_step(images, targets)
            else:
                losses = trainer._train_step(images, targets)
            synchronize(device)
            if i > 0:
                times.append(time.perf_counter() - tic)
            finite &= all(math.isfinite(float(v)) for v in losses.values())
            trainer.state.step += 1
        result.update({
            "finite": finite,
            "step_s": statistics.median(times),
            "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "syncs_forward_backward": sum(forward_syncs.values()) if device.type == "cuda" else None,
            "syncs_step": sum(step_syncs.values()) if device.type == "cuda" else None,
            "syncs_unikd": sum(n for k, n in step_syncs.items() if k.startswith("unikd/"))
            if device.type == "cuda" else None,
            "sync_lines": dict(step_syncs),
            "losses": sorted(losses),
        })
    return result


def phi_memory_mb(fam: str, args, device: torch.device, sample) -> float | None:
    """Peak memory (MB) that ``φ`` adds, forward and backward under AMP, for one image: the UniKD adaptor from
    the R18 student to the ``fam`` teacher's levels, on the student's features of ``sample`` (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.manual_seed(0)
    student = detector("retinanet", "resnet18").to(device)
    teacher = detector(fam, "resnet50")
    cfg = DistillConfig()
    adaptor = Adaptor(student.feature_strides, student.feature_channels, teacher.feature_strides,
                      teacher.feature_channels, layers=2, n_heads=cfg.adaptor_heads,
                      n_points=cfg.adaptor_points).to(device)
    images, _ = to_device(*collate([sample]), device)
    with torch.no_grad():
        features = student.extract_features(images)
    features = features.with_levels([f.detach().requires_grad_() for f in features.levels])
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.autocast("cuda", dtype=torch.float16):
        out = adaptor(features)
    sum(level.float().square().mean() for level in out.levels).backward()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "date": str(datetime.date.today())}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def run(args) -> dict:
    device = torch.device(args.device)
    samples = synthetic_batch(args.short, args.long)
    report = {"command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]), "env": environment(device),
              "settings": {"short": args.short, "long": args.long, "batch": len(samples), "steps": args.steps,
                           "rtol": args.rtol, "atol": args.atol}, "variants": {}}
    for variant in args.variants or variants():
        tic = time.perf_counter()
        try:
            result = check_variant(variant, args, device, samples)
        except Exception as err:  # a failure is a finding: report it and go on with the other variants
            result = {"error": f"{type(err).__name__}: {err}"[:2000]}
        result["wall_s"] = time.perf_counter() - tic
        report["variants"][variant] = result
        print(variant, json.dumps(result), flush=True)
    report["phi_peak_mb_per_image"] = {fam: phi_memory_mb(fam, args, device, samples[0]) for fam in TEACHERS}
    print("phi", report["phi_peak_mb_per_image"], flush=True)
    return report


def fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def section(report: dict) -> str:
    env, s, results = report["env"], report["settings"], report["variants"]
    where = f"{env.get('gpu', env['device'])}, torch {env['torch']}" + (f", CUDA {env['cuda']}" if "cuda" in env
                                                                        else "")
    lines = [
        "## GPU check",
        "",
        f"Command: `{report['command']}` ({env['date']}, {where}). Batch of {s['batch']} synthetic images, "
        f"{s['short']} × {s['long']} and {s['long']} × {s['short']}; {s['steps']} timed steps after a warm-up; "
        f"AMP tolerance on the first batch's losses: |amp − fp32| ≤ {s['atol']} + {s['rtol']} |fp32|. "
        "Syncs: `torch.cuda.set_sync_debug_mode('warn')` over one step, forward + backward apart.",
        "",
        "| variant | AMP ≈ fp32 (worst / tolerance) | finite | step (s) | peak MB | syncs fwd+bwd | syncs step | "
        "in unikd's code |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | **failed**: {r['error'].splitlines()[0][:200]} | | | | | | |")
            continue
        amp = r["amp_vs_fp32"]
        lines.append(f"| {name} | {'yes' if amp['ok'] else '**no**'} ({amp['worst_over_tolerance']:.2f}, "
                     f"{amp['dtype']}) | {'yes' if r['finite'] else '**no**'} | {r['step_s']:.3f} | "
                     f"{fmt(r['peak_mb'], '.0f')} | {fmt(r['syncs_forward_backward'], 'd')} | "
                     f"{fmt(r['syncs_step'], 'd')} | {fmt(r.get('syncs_unikd'), 'd')} |")
    lines.append("")
    for fam in TEACHERS:
        fit, uni = results.get(f"fitnet:{fam}", {}), results.get(f"unikd:{fam}", {})
        if "step_s" in fit and "step_s" in uni:
            lines.append(f"- UniKD / FitNet step, {fam} teacher: {uni['step_s'] / fit['step_s']:.2f}× "
                         "(the paper's: 1.03×).")
        fit2 = results.get(f"fitnet2:{fam}", {})
        if "step_s" in fit2 and "step_s" in uni:
            lines.append(f"- UniKD / FitNet with UniKD's two-layer φ, {fam} teacher: "
                         f"{uni['step_s'] / fit2['step_s']:.2f}×.")
    for fam, mb in report.get("phi_peak_mb_per_image", {}).items():
        if mb is not None:
            lines.append(f"- `φ` (UniKD's, 2 layers), forward + backward under AMP, one {s['short']} × {s['long']} "
                         f"image, R18 student → {fam} teacher: {mb:.0f} MB above what was allocated before.")
    sync_lines = collections.Counter()
    for r in results.values():
        sync_lines.update(r.get("sync_lines", {}))
    if sync_lines:
        lines.append("- Where the syncs are (source line: count over all variants): "
                     + ", ".join(f"`{k}` {v}" for k, v in sync_lines.most_common()) + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--short", type=int, default=800)
    parser.add_argument("--long", type=int, default=1333)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rtol", type=float, default=0.02)
    parser.add_argument("--atol", type=float, default=0.01)
    parser.add_argument("--variants", nargs="*", help="a subset of: " + " ".join(variants()))
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--doc", type=Path, help="write the '## GPU check' section into this markdown file")
    parser.add_argument("--from-json", type=Path, help="only rebuild --doc's section from a saved report")
    args = parser.parse_args()
    report = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.doc:
        replace_section(args.doc, section(report))
    print(section(report))


if __name__ == "__main__":
    main()
