"""Why a request gets no job: each refusal is answered with its own problem."""

from __future__ import annotations


class Refusal(Exception):
    """A request that gets no job, for a reason of its own or of the queue's."""

    reason = "refused"
    """The label a refusal is counted under (``deferred_jobs_refused_total``)."""


class QueueFull(Refusal):
    """``max_queued`` jobs are waiting: 503, try again later."""

    reason = "queue_full"


class HeadersTooLarge(Refusal):
    """The headers exceed ``max_header_size``: 431."""

    reason = "headers_too_large"


class BadRequest(Refusal):
    """A request the middleware refuses as it is: 400, with a reason."""

    reason = "bad_request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotStorable(BadRequest):
    """The job table cannot keep the request faithfully."""

    reason = "unstorable"


class NoOwner(Refusal):
    """``owner=fn`` named nobody: the job could never be read back, so none is made."""

    reason = "no_owner"


class KeyReused(Refusal):
    """An ``Idempotency-Key`` already used for a different request: 422."""

    reason = "key_reused"
