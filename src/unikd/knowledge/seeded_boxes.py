"""``B̂`` drawn on the host, image by image, from a generator seeded by ``(train.seed, image id, flip, shorter side,
draw)``: the knowledge store's draws (``unikd dump``) and online training's (stage 1 and stage 2), which the data
loader draws so that ``B̂`` reaches the device with the batch and nothing is read back for it.

Online, epoch ``e`` uses draw ``e``; a store of ``K`` draws serves draw ``e mod K`` (:mod:`unikd.knowledge.offline`),
so for the first ``K`` epochs an online run and an offline run of the same seed use the same boxes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from unikd.data import CocoDetection
from unikd.distill.common import B_HAT, normalise_targets, query_boxes

from .samples import AugmentedSamples


def record_seed(seed: int, key: tuple[int, bool, int | None], draw: int) -> int:
    """The seed of draw ``draw`` of ``B̂`` for the record ``key`` (:func:`unikd.knowledge.manifest.variant_key`)."""
    image_id, hflip, min_size = key
    return int(np.random.SeedSequence([seed, image_id, int(hflip), min_size or 0, draw]).generate_state(1)[0])


def seeded_query_boxes(target: dict, image_size: tuple[int, int], key: tuple[int, bool, int | None], n: int,
                       alpha: float, beta: float, seed: int, draw: int) -> tuple[Tensor, Tensor]:
    """Draw ``draw`` of one image's ``B̂``: boxes [N, 4] cxcywh normalised over ``image_size`` ``(h, w)``, and
    ``gt_index`` [N] (-1 for background), from ``target["boxes"]`` in image pixels, on ``target``'s device."""
    boxes, gt_index = query_boxes(normalise_targets([target], [image_size]), n, alpha, beta,
                                  torch.Generator().manual_seed(record_seed(seed, key, draw)))
    return boxes[0], gt_index[0]


class SeededQueryBoxes(AugmentedSamples):
    """``dataset``'s samples, each target with ``B̂`` (the keys of :data:`unikd.distill.common.B_HAT`: boxes
    [N, 4] cxcywh normalised over the image, ``gt_index`` [N]) of draw ``epoch``, from the sample's own seeded
    generator: what the AKE losses read instead of drawing ``B̂`` from the device tensors."""

    def __init__(self, dataset: CocoDetection, n: int, alpha: float, beta: float, seed: int):
        super().__init__(dataset)
        self.n, self.alpha, self.beta, self.seed = n, alpha, beta, seed

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image, target, key = self.sample(index)
        boxes, gt_index = seeded_query_boxes(target, tuple(image.shape[-2:]), key, self.n, self.alpha, self.beta,
                                             self.seed, self.epoch)
        return image, {**target, B_HAT[0]: boxes, B_HAT[1]: gt_index}
