"""Credentials kept apart from the other headers of a stored request.

They are stored in a column of their own so that finishing a job can forget
them with one update, and a replay puts them back where they were.
"""

from __future__ import annotations

from .._jobs import Headers


def split_credentials(
    headers: Headers, credential_names: frozenset[str]
) -> tuple[Headers, list[tuple[int, str, str]]]:
    """Separate credentials from other headers, remembering their positions."""
    kept: Headers = []
    secrets_: list[tuple[int, str, str]] = []
    for index, (name, value) in enumerate(headers):
        if name in credential_names:
            secrets_.append((index, name, value))
        else:
            kept.append((name, value))
    return kept, secrets_


def merge_credentials(headers: Headers, credentials: list[tuple[int, str, str]]) -> Headers:
    merged = list(headers)
    for index, name, value in credentials:
        merged.insert(index, (name, value))
    return merged
