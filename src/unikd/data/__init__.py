"""Data: COCO-format detection datasets and the embedded digits-det builder (see docs/data.md)."""
from .coco import CocoDetection, DatasetError, collate
from .digits import build_digits_det
from .resize import ImageResize

__all__ = ["CocoDetection", "DatasetError", "ImageResize", "collate", "build_digits_det"]
