"""The detectors' input transform: torchvision's ``GeneralizedRCNNTransform`` without its resize.

The data loader resizes (:mod:`unikd.data.resize`); inside the detector an image of any size, an 800x1333 one as
much as a 128x128 one, keeps its size in training and in inference, so targets, predictions and the
distillers all work in the loader's pixels.
"""
from __future__ import annotations

from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's detection transform (ImageNet)


class PadOnlyTransform(GeneralizedRCNNTransform):
    """Normalise with ImageNet's mean and std and pad the batch to a multiple of 32; never rescale.

    ``forward(images, targets)`` takes B images ``[3, H_i, W_i]`` in ``[0, 1]`` and gives an ``ImageList`` of
    ``[B, 3, H_pad, W_pad]`` (``H_pad = ceil(max_i H_i / 32) * 32``) with ``image_sizes = [(H_i, W_i)]``, and the
    targets unchanged. The inherited ``min_size``/``max_size`` are never read.
    """

    def __init__(self):
        super().__init__(min_size=0, max_size=0, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        """The identity: ``image`` ``[3, H, W]`` and ``target`` as they came."""
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(Normalize(mean={self.image_mean}, std={self.image_std}), no resize)"
