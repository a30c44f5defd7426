"""A browser on another origin submits a deferred request, reads the 202's
headers and polls the job to its result: headless Chromium (Debian's, driven
by Selenium) against uvicorn with Starlette's CORSMiddleware and gunicorn
with flask-cors."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from .support import free_port

pytestmark = pytest.mark.servers

PAGE = """<!doctype html>
<html><body><pre id="out">working</pre><script>
const api = new URLSearchParams(location.search).get("api");
async function run() {
  const submitted = await fetch(api + "/echo", {
    method: "POST",
    headers: {"content-type": "application/json"},
    body: JSON.stringify({hello: "browser"}),
  });
  const seen = {
    status: submitted.status,
    location: submitted.headers.get("Location"),
    operation: submitted.headers.get("Operation-Location"),
    retryAfter: submitted.headers.get("Retry-After"),
  };
  const polled = await fetch(api + seen.operation + "?wait=20");
  seen.etag = polled.headers.get("ETag");
  const again = await fetch(api + seen.operation, {headers: {"If-None-Match": seen.etag}});
  seen.revalidated = again.status;
  const result = await fetch(api + seen.location + "?wait=20");
  seen.resultStatus = result.status;
  seen.result = await result.json();
  const gone = await fetch(api + seen.operation, {method: "DELETE"});
  seen.deleted = gone.status;
  return seen;
}
run().then(
  seen => { document.getElementById("out").textContent = JSON.stringify(seen); },
  error => { document.getElementById("out").textContent = "error: " + error; },
);
</script></body></html>
"""


@pytest.fixture
def page_origin() -> Iterator[str]:
    """The page's own origin: another port than the API's, so every call is cross-origin."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        ("uvicorn", "tests.apps.cors_apps:starlette_app"),
        ("gunicorn-gthread", "tests.apps.cors_apps:flask_app"),
    ],
    ids=["starlette-corsmiddleware", "flask-cors"],
)
def test_a_page_on_another_origin_follows_a_202_to_its_result(
    browser, page_origin, serve, kind, target
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = serve(kind, target=target)
    browser.get(f"{page_origin}/?api={server.base}")
    WebDriverWait(browser, 60).until(
        lambda driver: driver.find_element(By.ID, "out").text != "working"
    )
    text = browser.find_element(By.ID, "out").text
    assert not text.startswith("error"), text
    seen = json.loads(text)
    job_id = seen["operation"].rsplit("/", 1)[-1]
    assert seen == {
        "status": 202,
        "location": f"/jobs/{job_id}/result",
        "operation": f"/jobs/{job_id}",
        "retryAfter": "1",
        "etag": seen["etag"],
        "revalidated": 304,
        "resultStatus": 201,
        "result": {"echo": {"hello": "browser"}},
        "deleted": 204,
    }
    assert seen["etag"].startswith('"')
