"""A detector's multi-scale features of one batch, with the geometry of each image in it.

Images of a batch are padded at the bottom and right to one size. Every quantity the distillers use is
defined on each image's own region: coordinates are normalised by the image's size (``(0, 0)`` its top-left
corner, ``(1, 1)`` its bottom-right), and a point in those coordinates is found on a level from the level's
stride. Nothing depends on how much padding the batch added, so a sample's result never depends on its
batch-mates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from unikd.host_copy import to_device
from unikd.transformer import Memory


@dataclass
class Pyramid:
    """Feature levels of a padded batch and the size of each image in it.

    Attributes:
        levels: L maps ``[B, C_l, H_l, W_l]``, finest first.
        strides: L ints, pixels per cell of each level.
        image_sizes: B pairs ``(h, w)``: the image's size in pixels, at the top-left of the padded batch.
    """

    levels: list[Tensor]
    strides: list[int]
    image_sizes: list[tuple[int, int]]

    def __post_init__(self):
        if len(self.levels) != len(self.strides):
            raise ValueError(f"{len(self.levels)} levels but {len(self.strides)} strides")
        if any(len(level) != len(self.image_sizes) for level in self.levels):
            raise ValueError(f"levels hold {[len(level) for level in self.levels]} images, image_sizes "
                             f"{len(self.image_sizes)}")

    def with_levels(self, levels: list[Tensor], strides: list[int] | None = None) -> Pyramid:
        """The same images with other levels (``strides`` default: these)."""
        return Pyramid(levels, self.strides if strides is None else strides, self.image_sizes)

    def valid_cells(self) -> list[list[tuple[int, int]]]:
        """Per image, per level ``(rows, cols)`` that hold some of the image: ``ceil(h / stride)``, at most
        the level's size."""
        return [[(min(math.ceil(h / s), f.shape[-2]), min(math.ceil(w / s), f.shape[-1]))
                 for f, s in zip(self.levels, self.strides)] for h, w in self.image_sizes]

    def valid_ratios(self) -> Tensor:
        """``[B, L, 2]`` float32 ``(x, y)``: the image's width and height in units of the level's width and
        height, ``w / (stride * W_l)``. A point at normalised image coordinates ``p`` lies at ``p * ratio`` in
        the level's own normalised coordinates (Deformable DETR's valid ratios, exact in pixels)."""
        shapes = [f.shape[-2:] for f in self.levels]
        ratios = [[(w / (s * W), h / (s * H)) for (H, W), s in zip(shapes, self.strides)] for h, w in self.image_sizes]
        return to_device(torch.tensor(ratios, dtype=torch.float32), self.levels[0].device)

    def padding_masks(self) -> list[Tensor]:
        """Per level ``[B, H_l, W_l]`` bool, True on cells that lie wholly in the padding."""
        valid = to_device(torch.tensor(self.valid_cells(), dtype=torch.long), self.levels[0].device)
        masks = []
        for level, f in enumerate(self.levels):
            h, w = f.shape[-2:]
            rows = torch.arange(h, device=f.device)[None, :, None] >= valid[:, level, 0, None, None]
            cols = torch.arange(w, device=f.device)[None, None, :] >= valid[:, level, 1, None, None]
            masks.append(rows | cols)
        return masks

    def memory(self) -> Memory:
        """The levels as one token sequence for deformable attention, with valid ratios and padding mask."""
        return Memory.from_levels(self.levels, self.valid_ratios(),
                                  torch.cat([m.flatten(1) for m in self.padding_masks()], dim=1))

    def scaled(self, factors: Tensor) -> Pyramid:
        """Each level divided by its entry of ``factors`` ``[L]``."""
        return self.with_levels([f / factors[i] for i, f in enumerate(self.levels)])
