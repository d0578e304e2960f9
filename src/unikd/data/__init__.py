"""Data: COCO-format detection datasets and the embedded digits-det builder (see docs/data.md)."""
from .coco import CocoDetection, DatasetError, collate
from .digits import build_digits_det

__all__ = ["CocoDetection", "DatasetError", "collate", "build_digits_det"]
