"""Completion webhooks: which callback URLs are allowed, what is sent, and
when to try again. No I/O here but the name lookup, which is passed in.

A callback URL must be absolute http(s), inside ``webhook_allowlist`` (a
list of ``scheme://host[:port][/path]`` prefixes), and a secret must be set
to sign with. Its host must resolve only to public addresses, unless the
allowlist names the address itself: a callback must never reach the
server's own loopback, a private network or a cloud metadata address. The
check runs when the request is accepted (so a bad URL gets 400 and no job)
and again before each delivery, which connects to the address it checked
(so a name that changes in between cannot point a delivery inward).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Callable, Iterable
from datetime import datetime
from urllib.parse import urlsplit

from . import _protocol as protocol
from ._jobs import DeferredOptions, Job, RequestInfo, StoredRequest
from ._refusals import BadRequest

MAX_URL_LENGTH = 2048
MAX_BACKOFF = 3600.0
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], list[str]]
DEFAULT_PORTS = {"http": 80, "https": 443}
HEADER = "callback-url"


class CallbackRefused(BadRequest):
    """A callback the middleware will not deliver to: 400, no job."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a callback URL points: its origin and path."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        if len(url) > MAX_URL_LENGTH or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
            raise CallbackRefused("The callback URL is not a valid absolute URL.")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise CallbackRefused("The callback URL is not a valid absolute URL.") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.hostname:
            raise CallbackRefused("The callback URL must be an absolute http or https URL.")
        if parts.username is not None or parts.password is not None:
            raise CallbackRefused("The callback URL must not carry credentials.")
        return cls(scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme], parts.path or "/")

    def literal_address(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None


class Allowlist:
    """``webhook_allowlist``: the URL prefixes callbacks may target."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = []
        for entry in entries:
            try:
                self.entries.append(Target.parse(entry))
            except CallbackRefused as refused:
                raise ValueError(f"webhook_allowlist entry {entry!r}: {refused.detail}") from None

    def admits(self, target: Target) -> Target | None:
        """The entry that admits ``target``, if any."""
        for entry in self.entries:
            same_origin = (entry.scheme, entry.host, entry.port) == (
                target.scheme,
                target.host,
                target.port,
            )
            if same_origin and _under(target.path, entry.path):
                return entry
        return None


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def check_callback(url: str, allowlist: Allowlist, secret: str | None, resolve: Resolve) -> str:
    """The callback URL if the middleware may deliver to it; raises
    CallbackRefused otherwise. Returns the address to connect to."""
    if not secret:
        raise CallbackRefused("Callbacks are not enabled here (no webhook secret is set).")
    target = Target.parse(url)
    entry = allowlist.admits(target)
    if entry is None:
        raise CallbackRefused("The callback URL is outside the webhook allowlist.")
    return public_address(target, entry, resolve)


def public_address(target: Target, entry: Target, resolve: Resolve) -> str:
    """The address to deliver to: the first the name resolves to, if every
    address is public or the allowlist entry names it literally."""
    named = entry.literal_address()
    literal = target.literal_address()
    try:
        addresses = (
            [literal]
            if literal is not None
            else [ipaddress.ip_address(a) for a in resolve(target.host, target.port)]
        )
    except (OSError, ValueError):
        raise CallbackRefused("The callback URL's host cannot be resolved.") from None
    if not addresses:
        raise CallbackRefused("The callback URL's host cannot be resolved.")
    for address in addresses:
        if not _is_public(address) and address != named:
            raise CallbackRefused(
                "The callback URL resolves to a loopback, private or link-local address."
            )
    return str(addresses[0])


def _is_public(address: IPAddress) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_global) and not address.is_multicast


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the lookup the checks use)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


# -- what is sent ----------------------------------------------------------------


def message_id(job: Job) -> str:
    """Stable across the attempts of one delivery (receivers deduplicate on
    it), new when a retried job finishes again."""
    return f"msg_{job.id}_{job.revision}"


def payload(job: Job, urls: protocol.JobURLs) -> bytes:
    occurred = job.finished_at
    return protocol.compact_json(
        {
            "type": "job.finished",
            "timestamp": occurred.isoformat().replace("+00:00", "Z") if occurred else None,
            "data": protocol.status_document(job, urls),
        }
    )


def signed_headers(secret: str, job: Job, body: bytes, now: datetime) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt (signed at send time)."""
    from standardwebhooks import Webhook

    msg_id = message_id(job)
    signature = Webhook(secret).sign(msg_id, now, body.decode())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }


def next_delay(attempt: int, backoff: float) -> float:
    """Seconds before attempt ``attempt + 1``: doubling, at most an hour."""
    return min(backoff * 2 ** (attempt - 1), MAX_BACKOFF)


class Callbacks:
    """Which callback each accepted request gets, checked before its job is
    made: the route's ``callback=fn`` decides where it has one (it may read
    the header itself), else the request's ``Callback-URL``."""

    def __init__(
        self, secret: str | None, allowlist: Iterable[str], resolve: Resolve = resolve_host
    ) -> None:
        self.secret = secret
        self.allowlist = Allowlist(allowlist)
        self.resolve = resolve

    @staticmethod
    def asked(request: StoredRequest, options: DeferredOptions) -> bool:
        return options.callback is not None or request.header(HEADER) is not None

    def url_for(self, request: StoredRequest, options: DeferredOptions) -> str | None:
        """The checked callback URL (this may look up its host), or None."""
        if options.callback is not None:
            url = options.callback(RequestInfo.of(request))
        else:
            url = request.header(HEADER)
        if url is None:
            return None
        url = url.strip()
        check_callback(url, self.allowlist, self.secret, self.resolve)
        return url
