"""Times as text, the way every accepted request writes its own twice:
in its row and in its 202."""

from __future__ import annotations

from datetime import datetime


def utc_text(value: datetime, separator: str = "T", zone: str = "") -> str:
    """A naive or UTC time as ``isoformat(separator, "microseconds")`` writes
    it, with ``zone`` for its offset. Every accepted request writes its time
    twice, and under load the requests of one second share all of it but
    the microseconds: that head is formatted once a second and kept, which
    halves the cost of a formatting."""
    v = value
    key = (v.second, v.minute, v.hour, v.day, v.month, v.year, separator)
    head = _SECOND_HEADS.get(key)
    if head is None:
        if len(_SECOND_HEADS) >= SECOND_HEADS_KEPT:
            _SECOND_HEADS.clear()
        parts = (v.year, v.month, v.day, separator, v.hour, v.minute, v.second)
        head = _SECOND_HEADS[key] = "%04d-%02d-%02d%s%02d:%02d:%02d." % parts  # noqa: UP031
    return "%s%06d%s" % (head, v.microsecond, zone)  # noqa: UP031 (faster than an f-string)


SECOND_HEADS_KEPT = 64
_SECOND_HEADS: dict[tuple[int | str, ...], str] = {}
"""The text of recent seconds, up to the microseconds. Threads share it:
each sees a whole entry or none, and a full dict is emptied, not trimmed."""
