"""Image files to 8-bit RGB: 16-bit and float images are scaled to [0, 255], never clipped or binarised.

PIL's own ``convert("RGB")`` clips a 16-bit image (every value above 255 becomes white) and turns a float
image into 0/1, so those modes are scaled here instead:

- ``I;16``, ``I;16B``, ``I;16L`` (16-bit grey, PNG and TIFF) and ``I`` (32-bit integer, TIFF): read as
  16-bit values, ``v / 65535 * 255``; an ``I`` image with a value outside [0, 65535] is refused.
- ``F`` (32-bit float, TIFF): read as values in [0, 1], ``v * 255``; any value outside [0, 1] (or not finite)
  is refused, as its scale cannot be known.
- every other mode PIL opens (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``,
  ``LAB``; a 16-bit RGB PNG opens as ``RGB``, already scaled by PIL) goes through ``convert("RGB")``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DatasetError

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def to_rgb8(img: Image.Image, path: Path) -> np.ndarray:
    """The pixels of ``img`` as uint8 [H, W, 3] RGB, scaled from 16-bit or float modes (module docstring)."""
    if img.mode in SIXTEEN_BIT:
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DatasetError(f"{path}: {img.mode} image with values in [{values.min()}, {values.max()}]; "
                                 "only 16-bit values (0..65535) can be read")
        return _grey_to_rgb(np.round(values * (255 / 65535)).astype(np.uint8))
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise DatasetError(f"{path}: float image with values in [{values.min()}, {values.max()}]; "
                                 "float images must hold values in [0, 1]")
        return _grey_to_rgb(np.round(values * 255).astype(np.uint8))
    try:
        return np.asarray(img.convert("RGB"))
    except ValueError as err:
        raise DatasetError(f"{path}: images of mode {img.mode} cannot be read ({err})") from None


def load_image(path: Path) -> torch.Tensor:
    """Decode an image file to uint8 [3, H, W] RGB; raise a DatasetError naming the file if it cannot."""
    try:
        with Image.open(path) as img:
            rgb = to_rgb8(img, path)
    except OSError as err:  # PIL's UnidentifiedImageError and "image file is truncated" are OSErrors
        raise DatasetError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()
