"""JSON text exactly as ``json.dumps`` writes it, without its cost per call.

``json.dumps`` builds the json module's C encoder anew for every call; for
the small documents written for each accepted request (a row's headers and
request metadata) building it costs as much as encoding. The encoders here
are built once, from the same C function with the arguments ``json.dumps``
would give it, except that they do not look for circular references: what
they encode is made by this package of strings, numbers, lists and dicts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import encoder
from typing import Any


def _unencodable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _encoder(item_separator: str, key_separator: str) -> Callable[[Any], str]:
    make = encoder.c_make_encoder
    if make is None:  # a Python without the json module's C part
        return json.JSONEncoder(separators=(item_separator, key_separator)).encode
    chunks = make(
        None,  # no circular-reference check
        _unencodable,
        encoder.encode_basestring_ascii,
        None,  # no indent
        key_separator,
        item_separator,
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )

    def encode(data: Any) -> str:
        return "".join(chunks(data, 0))

    return encode


dumps = _encoder(", ", ": ")
"""``json.dumps(data)``."""

compact = _encoder(",", ":")
"""``json.dumps(data, separators=(",", ":"))``."""
