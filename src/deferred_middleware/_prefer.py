"""The ``Prefer`` request header (RFC 7240), as far as a deferred route reads it.

``wait=N`` asks for the final answer if it is ready within N seconds;
``respond-async`` asks for a 202 rather than waiting. Unknown preferences
and malformed values are ignored, as the RFC asks, and only the first
instance of a preference counts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

# preference = token [ BWS "=" BWS word ] *( OWS ";" [ OWS parameter ] )
_PREFERENCE = re.compile(
    r"""\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)          # the name
        (?:\s*=\s*("(?:[^"\\]|\\.)*"|[^,;\s]*))?  # its value, a token or quoted
        (?:\s*;(?:[^,"]|"(?:[^"\\]|\\.)*")*)?     # parameters, skipped
        \s*(?:,|\Z)""",
    re.VERBOSE,
)


@dataclasses.dataclass(frozen=True)
class Preferences:
    respond_async: bool = False
    wait: int | None = None

    def wait_within(self, max_wait: float) -> int:
        """Seconds to hold the request for its answer: 0 when not asked."""
        if self.wait is None:
            return 0
        return int(min(self.wait, max_wait))


NONE = Preferences()


def parse_prefer(values: Iterable[str]) -> Preferences:
    """The preferences in every ``Prefer`` field line of a request."""
    seen: dict[str, str] = {}
    for value in values:
        position = 0
        while position < len(value):
            match = _PREFERENCE.match(value, position)
            if match is None or match.end() == position:
                break  # malformed from here on: keep what was read
            name = match.group(1).lower()
            seen.setdefault(name, _unquote(match.group(2) or ""))
            position = match.end()
    if not seen:
        return NONE
    wait_text = seen.get("wait", "")
    return Preferences(
        respond_async="respond-async" in seen,
        wait=int(wait_text) if wait_text.isascii() and wait_text.isdigit() else None,
    )


def _unquote(word: str) -> str:
    if len(word) >= 2 and word[0] == word[-1] == '"':
        return re.sub(r"\\(.)", r"\1", word[1:-1])
    return word
