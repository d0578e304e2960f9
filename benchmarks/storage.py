"""Disk per image of the offline stores (issue 12, item 5): UniKD's knowledge against FitNet's teacher features,
whole maps and foreground only, measured from the files that ``unikd dump`` writes for a few images.

    python benchmarks/storage.py [--images 4] [--coco-images 2] [--threads 1]

Two sizes, each through the distillation configs of the repository:

- digits-det: 128-px images, ``configs/digits/`` (R50 RetinaNet teacher with a 128-channel FPN, AKEs of
  ``ake.yaml``: N = 100, C = 128);
- COCO size: ``configs/coco/`` (256-channel FPN, the paper's N = 200, C = 256), images resized to 800×1333.
  There is no COCO here: the images are digits-det's, stretched to 1333×800 pixels with their boxes, so the
  foreground (FitNet's foreground store) is digits-det's share of the image, not COCO's.

The teacher and the AKEs have fresh weights, written by this script into checkpoints of the form ``unikd train``
and ``unikd pretrain-ake`` write: a record's size depends on the shapes, not on the values. Each store is
dumped in float16 (the default) with both flips (``data.hflip`` 0.5) and one draw of ``B̂``; bytes per record
= the store's shard files (safetensors, headers included) over its records. The manifest and the shard indexes
(a few hundred bytes per record, plus the image ids) are not counted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch
from doc_sections import replace_section
from PIL import Image

from unikd import cli
from unikd.config import load_config, to_dict
from unikd.data import CocoDetection, ImageResize, build_digits_det
from unikd.categories import dataset_categories
from unikd.detectors import build_detector
from unikd.distill import KnowledgeExtractors, save_ake, teacher_fingerprint
from unikd.engine.checkpoint import save_atomic
from unikd.engine.trainer import TrainState
from unikd.knowledge import KnowledgeStore
from unikd.knowledge.shards import SHARDS

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("unikd", "fitnet-full", "fitnet-foreground")
PAPER = {"fitnet-full": 23.1, "fitnet-foreground": 11.2}  # Tab. 4: FitNet's store over UniKD's, COCO
COCO_SIZE = (800, 1333)  # (h, w) after the COCO resize


def stretched_dataset(digits: Path, out: Path, n: int) -> Path:
    """The first ``n`` train images of ``digits`` stretched to 1333×800 pixels, with their boxes, as a COCO-format
    dataset in ``out`` (the same images as its train and val splits)."""
    h, w = COCO_SIZE
    source = json.loads((digits / "annotations" / "instances_train.json").read_text())
    images = source["images"][:n]
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    out_images, annotations, scale = [], [], {}
    for image in images:
        scale[image["id"]] = w / image["width"], h / image["height"]
        name = Path(image["file_name"]).name
        Image.open(digits / "images" / image["file_name"]).resize((w, h), Image.BILINEAR).save(out / "images" / name)
        out_images.append({**image, "file_name": name, "width": w, "height": h})
    for ann in source["annotations"]:
        if ann["image_id"] in scale:
            sx, sy = scale[ann["image_id"]]
            x, y, bw, bh = ann["bbox"]
            annotations.append({**ann, "bbox": [x * sx, y * sy, bw * sx, bh * sy], "area": bw * bh * sx * sy})
    data = {"images": out_images, "annotations": annotations, "categories": source["categories"]}
    for split in ("train", "val"):
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return out


def fresh_teacher_and_akes(teacher_yaml: Path, ake_yaml: Path, overrides: list[str], out: Path) -> tuple[Path, Path]:
    """A fresh-weight teacher checkpoint (the form ``unikd train`` writes) of ``teacher_yaml`` on the data of
    ``overrides``, and fresh AKEs of ``ake_yaml`` for it (the form ``unikd pretrain-ake`` writes)."""
    cfg = load_config(teacher_yaml, overrides)
    data = CocoDetection(cfg.data.root, cfg.data.train_split, ImageResize.from_config(cfg.data, train=True))
    teacher = build_detector(cfg.model, data.num_classes, backbone_weights=False)
    meta = {"config": to_dict(cfg), "num_classes": data.num_classes, "category_ids": data.category_ids,
            "categories": dataset_categories(data)}
    save_atomic({"model": teacher.state_dict(), "meta": meta, "train_state": vars(TrainState())}, out / "teacher.pt")
    akes = KnowledgeExtractors(load_config(ake_yaml).ake, len(teacher.feature_strides), teacher.feature_channels[0],
                               data.num_classes)
    save_ake(out / "ake.safetensors", akes, teacher_fingerprint(teacher, cfg.model), data.num_classes,
             data.category_ids)
    return out / "teacher.pt", out / "ake.safetensors"


def dump_store(config: Path, teacher: Path, ake: Path, overrides: list[str], store: Path, kind: str) -> Path:
    """``unikd dump CONFIG --knowledge KIND`` into ``store`` (UniKD with the AKEs ``ake``), ``--set`` each override."""
    extra = ["--ake", str(ake)] if kind == "unikd" else []
    sets = [flag for o in overrides for flag in ("--set", o)]
    if cli.main(["dump", str(config), "--teacher", str(teacher), "--knowledge", kind, "--out", str(store), *extra,
                 *sets]) != 0:
        raise SystemExit(f"unikd dump --knowledge {kind} failed")
    return store


def measure(config: Path, teacher: Path, ake: Path, overrides: list[str], out: Path) -> dict[str, dict]:
    """Dump each kind of store and measure it: ``{kind: {"records", "bytes", "per_record"}}``."""
    sizes = {}
    for kind in KINDS:
        store = dump_store(config, teacher, ake, overrides, out / kind, kind)
        records = len(KnowledgeStore(store))
        size = sum(p.stat().st_size for p in (store / SHARDS).glob("*.safetensors"))
        sizes[kind] = {"records": records, "bytes": size, "per_record": size / records}
    return sizes


def row(name: str, setting: str, sizes: dict[str, dict]) -> str:
    u, full, fg = (sizes[k]["per_record"] for k in KINDS)
    return (f"| {name} | {setting} | {sizes['unikd']['records']} | {u:,.0f} | {full:,.0f} | {fg:,.0f} | "
            f"{full / u:.1f}× | {fg / u:.1f}× | {fg / full:.0%} |")


def write(doc: Path, command: str, digits: dict, coco: dict, threads: int) -> None:
    coco_full_ratio = coco["fitnet-full"]["per_record"] / coco["unikd"]["per_record"]
    lines = [
        "## Knowledge store size",
        "",
        f"Command: `{command}` (measured {datetime.date.today()}, {threads} torch thread(s)). Bytes per record (one "
        "image under one flip) of the stores `unikd dump` wrote for a few training images, in float16, both flips, "
        "one draw of `B̂`: the shard files over the records (manifest and shard indexes not counted). Teacher and "
        "AKEs with fresh weights (sizes depend on shapes, not values). COCO size: digits-det images stretched to "
        "1333×800 with their boxes, resized by `configs/coco/` to 800×1333; their foreground is digits-det's, "
        "not COCO's (no COCO on this machine).",
        "",
        "| size | configs (teacher FPN, AKEs) | records | UniKD B/record | FitNet full B/record | "
        "FitNet foreground B/record | full / UniKD | foreground / UniKD | foreground / full |",
        "|---|---|---|---|---|---|---|---|---|",
        row("digits-det 128×128", "`configs/digits/`: 128 channels; N = 100, C = 128", digits),
        row("COCO 800×1333", "`configs/coco/`: 256 channels; N = 200, C = 256", coco),
        "",
        f"The paper (Tab. 4, COCO, its own teacher): FitNet's features {PAPER['fitnet-full']}× UniKD's store, "
        f"foreground only {PAPER['fitnet-foreground']}×, so its foreground is "
        f"{PAPER['fitnet-foreground'] / PAPER['fitnet-full']:.0%} of the full maps. Our foreground share is "
        "digits-det's (large digits on small canvases); at the paper's share the COCO-size full-map ratio above "
        f"would give {coco_full_ratio * PAPER['fitnet-foreground'] / PAPER['fitnet-full']:.1f}× for the foreground "
        "(arithmetic, not measured).",
    ]
    replace_section(doc, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="digits-det training images dumped")
    parser.add_argument("--coco-images", type=int, default=2, help="of those, how many are dumped at 800×1333")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    digits_cfg, coco_cfg = ROOT / "configs" / "digits", ROOT / "configs" / "coco"
    with tempfile.TemporaryDirectory(prefix="unikd-storage-") as tmp:
        tmp = Path(tmp)
        digits = build_digits_det(tmp / "digits-det", seed=0, n_train=args.images, n_val=2, size=128)
        common = [f"train.threads={args.threads}", "data.batch_size=2", "data.workers=0"]
        on_digits = [f"data.root={digits}", *common]
        teacher, ake = fresh_teacher_and_akes(digits_cfg / "retinanet_r50_teacher.yaml", digits_cfg / "ake.yaml",
                                              on_digits, tmp / "digits-models")
        digits_sizes = measure(digits_cfg / "distill_retinanet_r18.yaml", teacher, ake, on_digits, tmp / "digits")
        coco_data = stretched_dataset(digits, tmp / "coco-size", args.coco_images)
        on_coco = [f"data.root={coco_data}", "data.train_split=train", "data.val_split=val", *common]
        teacher, ake = fresh_teacher_and_akes(coco_cfg / "retinanet_r50_teacher.yaml", coco_cfg / "ake.yaml",
                                              on_coco, tmp / "coco-models")
        coco_sizes = measure(coco_cfg / "distill_retinanet_r18.yaml", teacher, ake, on_coco, tmp / "coco")
    print(json.dumps({"digits": digits_sizes, "coco": coco_sizes}, indent=1))
    write(args.doc, "python benchmarks/storage.py " + " ".join(sys.argv[1:]), digits_sizes, coco_sizes, args.threads)
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
