"""The errors miprun raises on purpose: one base class, each message one line saying what was found,
what was expected and what to do. The CLI prints them as ``miprun: error: MESSAGE``; the Python API
raises them before any work where the input can be checked up front."""

from __future__ import annotations

import errno


class MiprunError(Exception):
    """Base of every error miprun raises on purpose (``except MiprunError`` catches them all)."""


class InvalidOptionError(MiprunError, ValueError):
    """An option has a value outside what it accepts (``num_blocks=0``, ``ratio=1.5``, ``samples=0``)."""


class InvalidTypeError(MiprunError, TypeError):
    """An option has the wrong type (``num_blocks=2.7``, ``num_blocks=True``, ``k="5"``)."""


class UnknownNameError(MiprunError, ValueError):
    """A name looked up in a registry (method, estimator, repair, task, statistic) does not exist."""


class UnsupportedArchitectureError(MiprunError, ValueError):
    """The model's ``model_type`` has no layout, or its layout cannot do what was asked."""


class ModelLoadError(MiprunError, RuntimeError):
    """A model could not be loaded, or loaded incompletely (missing or unexpected weights)."""


class DataError(MiprunError, ValueError):
    """Calibration or evaluation text is missing, too short, or in a format miprun cannot read."""


class ScoresError(MiprunError, ValueError):
    """A scores file or cache entry is unreadable, incomplete, non-finite, or made for another model."""


class MissingEvidenceError(ScoresError):
    """The scores at hand lack what a method needs (e.g. a scores file written for another method)."""


class NonFiniteError(MiprunError, RuntimeError):
    """A forward pass produced NaN or Inf."""


class OutputError(MiprunError, OSError):
    """The output cannot be written where asked (exists, is an input, not writable, disk full)."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """``--model`` names a path where nothing (or no complete model) is."""


class DataNotFoundError(DataError, FileNotFoundError):
    """``--calib`` / ``--eval-text`` names a file that is not there."""


class GgufError(MiprunError, ValueError):
    """A GGUF file cannot be written as asked (its format cannot express the cut, or a name has no match)."""


class MissingDependencyError(MiprunError, ImportError):
    """An optional package a feature needs is not installed (the message names the pip command)."""


# ----------------------------------------------------------------------------- writing outputs


class OutputExistsError(OutputError, FileExistsError):
    """``out`` exists and may not be replaced: no ``--overwrite``, or it is not a miprun output."""


class UnsafeOutputError(MiprunError, ValueError):
    """``out`` overlaps an input or the current directory, or is a mount point."""


class OutputNotWritableError(OutputError):
    """The folder that would hold ``out`` does not allow writing."""


class OutputBusyError(OutputError):
    """Another process (or thread) is writing the same ``out`` now."""


class DiskFullError(OutputError):
    """The disk (or quota) filled up while writing; the previous output is untouched."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


class NonFiniteJSONError(MiprunError, ValueError):
    """A NaN or infinity was about to be written into a JSON file, which strict JSON cannot hold."""


class UnprovenJournalError(OutputError):
    """A ``.NAME.swap`` beside ``out`` that miprun cannot prove it wrote: recovery will not act on it."""
