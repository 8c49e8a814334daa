"""The classes a scores file's evidence is read back with, by key.

The methods that gather evidence add their classes here as they are defined (``Method.evidence_types``), so
reading a scores file never imports a method: the file format sits below the methods that fill it. An
evidence class has ``to_json()`` and ``from_json(data)``; one that a version-1 file kept under
``baselines`` in another form converts it with ``from_version1(data)`` (None: nothing recorded).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from miprun.errors import UnknownNameError


class EvidenceTypes:
    """Evidence key -> class. Several methods may read one key (``cosine``) with one class; two classes
    for one key would make a scores file ambiguous, so that is refused."""

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}

    def add(self, key: str, cls: type) -> None:
        held = self._classes.setdefault(key, cls)
        if held is not cls and _same_name(held, cls):  # the class defined again (a notebook cell run twice)
            self._classes[key] = cls
        elif held is not cls:
            raise ValueError(
                f"evidence {key!r} is read with {held.__qualname__} already; {cls.__qualname__} needs a key "
                "of its own (a scores file holds one class per key)"
            )

    def get(self, key: str) -> Any:  # a class with from_json (and maybe from_version1)
        """The class of evidence ``key``; a miss names the closest key and every known one."""
        if key not in self._classes:
            close = difflib.get_close_matches(key, self._classes, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"no method gathers evidence {key!r}.{hint} Known evidence: {', '.join(sorted(self._classes))}. "
                "The scores file was written by a method this install does not have (or not imported yet: "
                "`import miprun.methods` adds the built-in ones, as miprun.score, select, prune and the CLI do)."
            )
        return self._classes[key]

    def __contains__(self, key: object) -> bool:
        return key in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)


def _same_name(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


# Process-wide, as every registry is: filled once as the method classes are defined.
EVIDENCE_TYPES = EvidenceTypes()
