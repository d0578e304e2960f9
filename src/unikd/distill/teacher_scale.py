"""The scale bridge between teacher and student (DESIGN §2, "Geometry and scale"): a fixed statistic of the
teacher, never one of the current batch.

FPN outputs of different detectors differ in scale by orders of magnitude (digits-det R50 teachers trained from
scratch: RMS 6 to 540, ``docs/results.md``). The AKEs and FitNet read the teacher divided by its root mean square
on each level, measured once over training images; the adaptor ``φ`` ends in a layer norm and so produces
features of that unit scale. Stage 1 measures it and stores it with the AKE weights, so stage 2 needs nothing
from the teacher at run time to set it.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from unikd.detectors import DetectorAdapter

RMS_IMAGES = 256  # training images the statistic is measured on


@torch.no_grad()
def measure_teacher_rms(teacher: DetectorAdapter, dataset, collate_fn, device: torch.device | str = "cpu",
                        images: int = RMS_IMAGES, batch_size: int = 8) -> Tensor:
    """``[L]`` float32 on the CPU: the root mean square of the teacher's features on each level, over every
    channel of every cell that holds some image (padding excluded), of the first ``images`` samples of
    ``dataset`` in index order. Deterministic: every DDP rank measures the same value."""
    was_training = teacher.training
    teacher.eval()
    loader = DataLoader(Subset(dataset, range(min(images, len(dataset)))), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_fn)
    squares = counts = None
    try:
        for batch, _ in loader:
            pyramid = teacher.extract_features([image.to(device) for image in batch])
            valid = [~mask for mask in pyramid.padding_masks()]
            level_squares = torch.stack([(f.float().pow(2).sum(1) * v).sum() for f, v in zip(pyramid.levels, valid)])
            level_counts = torch.stack([v.sum() * f.shape[1] for f, v in zip(pyramid.levels, valid)])
            squares = level_squares if squares is None else squares + level_squares
            counts = level_counts if counts is None else counts + level_counts
    finally:
        teacher.train(was_training)
    if squares is None:
        raise ValueError("measuring the teacher's scale needs at least one image")
    return (squares / counts).sqrt().cpu()
