"""FitNet's teacher features in a knowledge store (issue 12, item 4): what the modified FitNet reads from the
teacher, stored per image and augmentation in the same shards, manifest and checks as UniKD's knowledge.

A record holds the teacher's raw features on each of its L levels, over the image's own cells only (the
``ceil(h / stride) × ceil(w / stride)`` cells that hold some of the image; the batch's padding is not stored):

========================  ===========  ====================================================================
field                     dtype        shape
========================  ===========  ====================================================================
``level{l}`` (full)       store dtype  ``[C_l, ceil(h / s_l), ceil(w / s_l)]``, the whole map
``level{l}`` (foreground) store dtype  ``[C_l, n_l]``, the ``n_l`` cells whose centre lies inside a
                                       ground-truth box, in row-major order
========================  ===========  ====================================================================

The sizes differ from image to image (``null`` in the manifest's shapes). FitNet reads the teacher divided by
its fixed per-level RMS: the manifest stores that scale (``teacher_rms``, measured as the online job measures
it), so stage 2 needs nothing else from the teacher. A foreground record gives FitNet's loss exactly: the loss
reads the teacher on the foreground cells alone, which the loader finds again from the sample's boxes.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from unikd.distill.feature_kd import box_cells
from unikd.host_copy import to_device
from unikd.pyramid import Pyramid

from .manifest import KnowledgeStoreError

REGIONS = {"fitnet-full": "full", "fitnet-foreground": "foreground"}  # store knowledge -> the cells it keeps


def image_cells(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """``(rows, cols)`` of a level's cells that hold some of an image of ``(h, w)`` pixels."""
    h, w = image_size
    return math.ceil(h / stride), math.ceil(w / stride)


def feature_fields(channels: list[int], knowledge: str, dtype: str) -> dict[str, dict]:
    """The manifest's field specs of a FitNet record of ``knowledge`` (a key of :data:`REGIONS`) for a teacher
    of ``channels`` per level (the table above)."""
    extra = [None, None] if REGIONS[knowledge] == "full" else [None]
    return {f"level{l}": {"dtype": dtype, "shape": [c, *extra]} for l, c in enumerate(channels)}


def feature_records(pyramid: Pyramid, targets: list[dict[str, Tensor]], knowledge: str,
                    dtype: torch.dtype) -> list[dict[str, Tensor]]:
    """The records of a batch: per image, each level cut to the image's own cells (full) or to its foreground
    cells (``[C_l, n_l]``), in ``dtype``. ``targets``: boxes xyxy in image pixels."""
    records = []
    for i, (target, size) in enumerate(zip(targets, pyramid.image_sizes)):
        record = {}
        for l, (level, stride) in enumerate(zip(pyramid.levels, pyramid.strides)):
            rows, cols = image_cells(size, stride)
            cells = level[i, :, :rows, :cols]
            if REGIONS[knowledge] == "foreground":
                cells = cells[:, box_cells(target["boxes"], (rows, cols), stride).any(0)]
            record[f"level{l}"] = cells.to(dtype)
        records.append(record)
    return records


def full_maps(record: dict[str, Tensor], target: dict[str, Tensor], image_size: tuple[int, int], strides: list[int],
              knowledge: str) -> dict[str, Tensor]:
    """A record as the whole maps of its image, made by the data loader on the host: ``level{l}``
    ``[C_l, ceil(h / s_l), ceil(w / s_l)]`` in the stored dtype, a foreground record's cells put back inside the
    sample's boxes (``target["boxes"]``, xyxy in image pixels) and zeros elsewhere. A record that does not fit its
    sample (another image size, another foreground) is refused."""
    maps = {}
    for l, stride in enumerate(strides):
        h, w = image_cells(image_size, stride)
        stored = record[f"level{l}"]
        if REGIONS[knowledge] == "full":
            if tuple(stored.shape[-2:]) != (h, w):
                raise KnowledgeStoreError(f"the stored features of image {target['image_id']} cover "
                                          f"{list(stored.shape[-2:])} cells on level {l}, its image {[h, w]}: "
                                          "not the image it was dumped from")
            maps[f"level{l}"] = stored
            continue
        foreground = box_cells(target["boxes"], (h, w), stride).any(0)
        if int(foreground.sum()) != stored.shape[-1]:
            raise KnowledgeStoreError(f"the stored foreground of image {target['image_id']} has {stored.shape[-1]} "
                                      f"cells on level {l}, its boxes {int(foreground.sum())}: not the image and "
                                      "boxes it was dumped from")
        whole = stored.new_zeros(stored.shape[0], h, w)
        whole[:, foreground] = stored
        maps[f"level{l}"] = whole
    return maps


def stored_pyramid(maps: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]], strides: list[int],
                   device: torch.device) -> Pyramid:
    """The teacher pyramid of a batch from its records' whole maps (:func:`full_maps`), float32 on ``device``:
    level ``l`` is ``[B, C_l, H_l, W_l]`` with ``(H_l, W_l)`` the batch's largest image cells, each image's cells
    at its top-left and zeros elsewhere. Built on the host and copied once per level, without waiting for the
    device (:func:`unikd.host_copy.to_device`)."""
    levels = []
    for l, stride in enumerate(strides):
        cells = [image_cells(size, stride) for size in image_sizes]
        rows, cols = max(r for r, _ in cells), max(c for _, c in cells)
        level = torch.zeros(len(maps), maps[0][f"level{l}"].shape[0], rows, cols)
        for i, (m, (h, w)) in enumerate(zip(maps, cells)):
            level[i, :, :h, :w] = m[f"level{l}"]
        levels.append(to_device(level, device))
    return Pyramid(levels, list(strides), list(image_sizes))
