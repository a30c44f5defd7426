"""Freezing what a process loaded out of the garbage collector's way.

An app's modules, routes and pools live as long as its process. Every full
collection walks them all again, and full collections come often under
load: a request that waits for its row keeps its objects alive across a
collection or two, so they reach the oldest generation, and enough of
those trigger a full collection. Frozen once the app has started, the
loaded objects are left out of every later collection.

Once per process: an app started again in the same process (a test suite's
``with TestClient(app)`` per test) would otherwise pay a full collection
each time, and freeze whatever earlier starts left alive for good.
"""

from __future__ import annotations

import gc

_frozen = False


def freeze_what_was_loaded() -> None:
    """Collect what starting up left behind, then freeze the rest."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()
