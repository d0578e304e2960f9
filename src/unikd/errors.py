"""The one base class of the errors a user can fix.

A :class:`UserError` means bad input: a config key or value, a dataset, a file that is not what it should
be, a teacher or AKE file that does not fit the job. Its message names the key or the file and says what is
wrong. The command line prints it as one line (``unikd: error: ...``, exit status 2); any other exception is
a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (bad input, config, file); the CLI prints it as one line."""


class CorruptFileError(UserError):
    """A file of ours whose content is damaged: truncated, unreadable, or its tensors fail their checksum."""


class OutputError(UserError):
    """An output folder that cannot be used: it holds another run, is a file, or cannot be written."""


class DatasetError(UserError, ValueError):
    """A COCO-format dataset that cannot be used as it is; the message names the file or annotation id."""


class DivergedError(UserError, FloatingPointError):
    """Training produced a non-finite loss or weights; the run stopped and kept its last good checkpoint."""


class ResumeError(UserError):
    """A ``--resume`` whose checkpoint does not fit the job (other model, data or optimiser settings)."""
