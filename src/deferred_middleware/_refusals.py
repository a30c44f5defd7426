"""Why a request gets no job: each refusal is answered with its own problem."""

from __future__ import annotations


class Refusal(Exception):
    """A request that gets no job, for a reason of its own or of the queue's."""


class QueueFull(Refusal):
    """``max_queued`` jobs are waiting: 503, try again later."""


class HeadersTooLarge(Refusal):
    """The headers exceed ``max_header_size``: 431."""


class BadRequest(Refusal):
    """A request the middleware refuses as it is: 400, with a reason."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotStorable(BadRequest):
    """The job table cannot keep the request faithfully."""


class NoOwner(Refusal):
    """``owner=fn`` named nobody: the job could never be read back, so none is made."""


class KeyReused(Refusal):
    """An ``Idempotency-Key`` already used for a different request: 422."""
