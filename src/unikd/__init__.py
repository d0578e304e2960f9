"""unikd: universal knowledge distillation for object detectors (UniKD, ICCV 2023)."""

__version__ = "0.1.0"
