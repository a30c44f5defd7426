"""Hooks for the schemathesis run against the FastAPI app's document
(loaded with ``SCHEMATHESIS_HOOKS``). Not a test module.

A schema-valid Idempotency-Key is made unique per generated request: a key
reused with another body is rightly refused (422), which schemathesis would
take for a valid request rejected. Idempotency has tests of its own; the
malformed keys schemathesis generates are kept, to check their 400."""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"[!-~]{1,255}")


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers or {}
    if VALID_KEY.fullmatch(str(headers.get("Idempotency-Key", ""))):
        headers["Idempotency-Key"] = uuid.uuid4().hex
