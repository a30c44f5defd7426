"""A real webhook receiver on loopback for the tests: a threaded HTTP server
that verifies each delivery's signature with ``standardwebhooks`` and
answers from a script. Not a test module."""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks import Webhook

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    payload: dict[str, Any] | None  # None when the signature did not verify


@dataclass
class Receiver:
    port: int
    answers: list[Any] = field(default_factory=list)  # 200, ("sleep", s, 200), ("redirect", to)
    deliveries: list[Delivery] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    _server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    payload = Webhook(SECRET).verify(body, headers)
                except Exception:
                    payload = None
                receiver.deliveries.append(Delivery(self.path, headers, payload))
                answer = receiver.answers.pop(0) if receiver.answers else 200
                if isinstance(answer, tuple) and answer[0] == "sleep":
                    time.sleep(answer[1])
                    answer = answer[2]
                if isinstance(answer, tuple) and answer[0] == "hold":
                    receiver.release.wait(60)
                    answer = answer[1]
                if isinstance(answer, tuple) and answer[0] == "redirect":
                    self.send_response(307)
                    self.send_header("location", answer[1])
                else:
                    self.send_response(answer)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self.release.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def verified(self) -> list[dict[str, Any]]:
        return [d.payload for d in self.deliveries if d.payload is not None]
