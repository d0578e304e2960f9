"""The report of finished runs (``unikd report``, the end of ``unikd demo``): a metrics table, the stages'
commands and times, and the paper's pictures (Fig. 1 activation maps, Fig. 4 sampling points) beside mAP
bars, training curves and detections. Needs matplotlib (the ``plots`` extra)."""
from .build import build_report, require_matplotlib
from .runs import Run, Runs, find_runs

__all__ = ["Run", "Runs", "build_report", "find_runs", "require_matplotlib"]
