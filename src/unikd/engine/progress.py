"""Progress bars: tqdm on rank 0, redrawn rarely when stderr is a log file rather than a terminal."""
from __future__ import annotations

import sys

from tqdm import tqdm

from . import distributed as D


def progress(iterable, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable``; silent on ranks other than 0."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, disable=not D.is_main(), dynamic_ncols=interactive,
                mininterval=0.1 if interactive else 30.0, **kwargs)
