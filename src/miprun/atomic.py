"""Writing miprun's output safely: single files and whole folders that appear complete or not at all.

Each job has its module: single files (:mod:`miprun.files`), what may be written where
(:mod:`miprun.output_policy`), a folder as one transaction with its lock, journal and recovery
(:mod:`miprun.transaction`), and signals (:mod:`miprun.signals`); their errors live in
:mod:`miprun.errors`. This module gathers the names the rest of miprun writes with.
"""

from __future__ import annotations

from miprun.errors import (
    DiskFullError,
    NonFiniteJSONError,
    OutputBusyError,
    OutputExistsError,
    OutputNotWritableError,
    UnprovenJournalError,
    UnsafeOutputError,
)
from miprun.files import atomic_file, atomic_path, atomic_write_bytes, atomic_write_text, write_json
from miprun.output_policy import (
    MANIFEST_NAME,
    check_file_output,
    check_results_file,
    is_miprun_output,
    locked_output,
)
from miprun.signals import Interrupted, interrupts_as_keyboard_interrupt
from miprun.transaction import check_output, recover, write_steps

__all__ = [
    "MANIFEST_NAME",
    "DiskFullError",
    "Interrupted",
    "NonFiniteJSONError",
    "OutputBusyError",
    "OutputExistsError",
    "OutputNotWritableError",
    "UnprovenJournalError",
    "UnsafeOutputError",
    "atomic_file",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_file_output",
    "check_output",
    "check_results_file",
    "interrupts_as_keyboard_interrupt",
    "is_miprun_output",
    "locked_output",
    "recover",
    "write_json",
    "write_steps",
]
