"""The Prefer header (RFC 7240), as a deferred route reads it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deferred_middleware._prefer import NONE, Preferences, parse_prefer


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], NONE),
        ([""], NONE),
        (["respond-async"], Preferences(respond_async=True)),
        (["RESPOND-ASYNC"], Preferences(respond_async=True)),
        (["wait=10"], Preferences(wait=10)),
        (["wait = 10"], Preferences(wait=10)),
        (['wait="7"'], Preferences(wait=7)),
        (['wait="\\7"'], Preferences(wait=7)),  # a quoted-pair
        (["respond-async, wait=100"], Preferences(respond_async=True, wait=100)),
        (["respond-async", "wait=3"], Preferences(respond_async=True, wait=3)),
        # Only the first instance of a preference counts (RFC 7240 §2).
        (["wait=3, wait=9"], Preferences(wait=3)),
        (["wait=3", "wait=9"], Preferences(wait=3)),
        # Parameters are read past, quoted commas included.
        (['foo; bar="a,b", wait=4'], Preferences(wait=4)),
        (["return=minimal; foo, respond-async"], Preferences(respond_async=True)),
        # Values that are not delta-seconds are ignored, not guessed at.
        (["wait=-1"], NONE),
        (["wait=1.5"], NONE),
        (["wait=soon"], NONE),
        (["wait=٣"], NONE),
        (["wait"], NONE),
        (["handling=lenient"], NONE),
    ],
)
def test_preferences_are_read_as_rfc_7240_says(values, expected):
    assert parse_prefer(values) == expected


def test_what_follows_a_malformed_part_is_not_guessed_at():
    assert parse_prefer(["respond-async, =broken, wait=5"]) == Preferences(respond_async=True)


@pytest.mark.parametrize(
    ("wait", "cap", "held"), [(None, 30, 0), (0, 30, 0), (5, 30, 5), (99, 30, 30), (9, 2.5, 2)]
)
def test_the_wait_is_capped_by_max_wait(wait, cap, held):
    assert Preferences(wait=wait).wait_within(cap) == held


@given(st.text())
def test_any_header_value_parses_without_error(value):
    preferences = parse_prefer([value])
    assert preferences.wait is None or preferences.wait >= 0


def test_a_mode_other_than_always_or_prefer_is_refused_when_marking():
    from deferred_middleware import deferred

    with pytest.raises(ValueError, match="mode is one of always, prefer"):
        deferred(mode="sometimes")
