"""The package's JSON encoders write exactly what the json module writes."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deferred_middleware import _json

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(VALUES)
def test_the_encoders_write_what_json_dumps_writes(value):
    assert _json.dumps(value) == json.dumps(value)
    assert _json.compact(value) == json.dumps(value, separators=(",", ":"))
    # Built here too, inside the test, so mutation testing sees who checks them.
    assert _json._encoder(", ", ": ")(value) == json.dumps(value)
    assert _json._encoder(",", ":")(value) == json.dumps(value, separators=(",", ":"))


def test_non_finite_numbers_and_non_ascii_text_are_written_as_json_dumps_writes_them():
    value = {"é": [math.inf, -math.inf, math.nan, "\u2028\x00"], "n": None, "b": False}
    assert _json._encoder(", ", ": ")(value) == json.dumps(value)


def test_keys_keep_their_order_and_are_never_skipped():
    assert _json._encoder(",", ":")({"b": 1, "a": 2}) == '{"b":1,"a":2}'
    with pytest.raises(TypeError, match="keys must be"):
        _json._encoder(",", ":")({(1, 2): "a tuple key"})


def test_what_json_cannot_encode_is_refused():
    with pytest.raises(TypeError, match="bytes is not JSON serializable"):
        _json._encoder(", ", ": ")([b"raw"])


def test_without_the_json_module_s_c_part_the_python_encoder_is_used(monkeypatch):
    monkeypatch.setattr(_json.encoder, "c_make_encoder", None)
    compact = _json._encoder(",", ":")
    assert compact({"a": [1, "é"]}) == '{"a":[1,"\\u00e9"]}'
