"""Telling an unreachable Hugging Face Hub apart from other failures, so the error can say so."""

from __future__ import annotations

from miprun.errors import MiprunError


class HubUnreachableError(MiprunError, RuntimeError):
    """A model or data set named on the Hugging Face Hub could not be fetched (offline machine)."""


def is_hub_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its cause chain) says the hub could not be reached."""
    markers = ("connect", "offline", "timeout", "localentrynotfound", "nameresolution", "gaierror")
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__.lower()
        text = str(cur).lower()
        if any(m in name for m in markers) or "couldn't connect" in text or "couldn't reach" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False
