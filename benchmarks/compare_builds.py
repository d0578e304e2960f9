"""Compare two digits-det builds pixel by pixel and annotation by annotation (docs/data.md, "Same bytes").

    python benchmarks/compare_builds.py BUILD_A BUILD_B

Per split: whether the image lists agree, how many annotations differ (matched by id, with the first few box
pairs), and how many images differ in their pixels, in how many pixels, by how much at most.
To build with other Pillow / numpy versions: a venv with them and this repo's ``src`` on ``PYTHONPATH`` (torch
from this one's site-packages through a ``.pth`` file), then
``python -c "from unikd.data import build_digits_det; build_digits_det('BUILD')"``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def compare_split(a: Path, b: Path, split: str) -> str:
    """One line: the differences between the two builds' ``split``."""
    coco_a, coco_b = (json.loads((r / "annotations" / f"instances_{split}.json").read_text()) for r in (a, b))
    anns_a, anns_b = ({x["id"]: x for x in c["annotations"]} for c in (coco_a, coco_b))
    changed = [k for k in anns_a if anns_b.get(k) != anns_a[k]] + [k for k in anns_b if k not in anns_a]
    boxes = [(anns_a.get(k, {}).get("bbox"), anns_b.get(k, {}).get("bbox")) for k in changed[:3]]
    images, pixels, largest = 0, 0, 0
    for image in coco_a["images"]:
        x, y = (np.asarray(Image.open(r / "images" / image["file_name"])).astype(int) for r in (a, b))
        if x.shape != y.shape or (x != y).any():
            diff = np.abs(x - y) if x.shape == y.shape else np.full(x.shape, 255)
            images, pixels, largest = images + 1, pixels + int((diff > 0).sum()), max(largest, int(diff.max()))
    return (f"{split}: same images listed {coco_a['images'] == coco_b['images']}; annotations "
            f"{len(anns_a)} / {len(anns_b)}, {len(changed)} differ {boxes}; {images} of {len(coco_a['images'])} "
            f"images differ in {pixels} pixels, by {largest} at most")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    for split in ("train", "val"):
        print(compare_split(args.a, args.b, split))


if __name__ == "__main__":
    main()
