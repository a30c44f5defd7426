"""The operator's routes on real servers: the dashboard in headless Chromium
against uvicorn (the page loads, a job appears, its progress moves, cancel
and retry work), and Prometheus metrics from a web process and from
``deferred-middleware worker --metrics-port``, parsed with prometheus_client."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .support import eventually, free_port

pytestmark = pytest.mark.servers


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = httpx.get(url, timeout=10)
    assert reply.status_code == 200, reply.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def test_the_dashboard_follows_a_job_live_and_cancels_and_retries_it(browser, serve, gates):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = serve("uvicorn", DASHBOARD="open", METRICS="1")
    browser.get(server.base + "/jobs/")
    assert browser.title == "Jobs"
    assert "No jobs." in browser.find_element(By.ID, "live").text
    job_id = httpx.post(server.base + "/stepped?gate=step").json()["id"]

    row = f'tr[data-job="{job_id}"]'

    def shows(*texts: str):
        def check(driver) -> bool:
            found = driver.find_elements(By.CSS_SELECTOR, row)
            return bool(found) and all(text in found[0].text for text in texts)

        return check

    def click(selector: str):  # the table is redrawn live: find and click in one step
        return lambda driver: driver.find_element(By.CSS_SELECTOR, selector).click() or True

    stale = (StaleElementReferenceException,)
    wait = WebDriverWait(browser, 30, poll_frequency=0.1, ignored_exceptions=stale)
    wait.until(shows("running", "25%", "first step", "POST /stepped"))  # it appeared, live
    gates("step-1")
    wait.until(shows("75%", "second step"))  # its progress moved
    wait.until(click(f'{row} button[data-action="cancel"]'))
    wait.until(shows("canceled"))
    assert httpx.get(f"{server.base}/jobs/{job_id}").json()["status"] == "canceled"
    assert browser.find_element(By.ID, "said").text == ""  # no complaint from the server

    wait.until(click(f'{row} button[data-action="retry"]'))
    gates("step-2")
    wait.until(shows("succeeded"))
    wait.until(click(f"{row} a"))
    wait.until(lambda driver: driver.title == f"Job {job_id}")
    detail = browser.find_element(By.ID, "live").text
    assert "POST /stepped?gate=step" in detail and "succeeded" in detail
    assert "2 of" in detail  # the canceled attempt and the retried one

    counted = scrape(server.base + "/jobs/metrics")
    assert counted[("deferred_jobs_accepted_total", (("queue", "default"),))] == 1
    finished = ("deferred_jobs_finished_total", (("queue", "default"), ("status", "succeeded")))
    assert counted[finished] == 1
    assert counted[("deferred_jobs", (("queue", "default"), ("status", "succeeded")))] == 1


def test_a_closed_dashboard_is_not_there(serve):
    server = serve("uvicorn")
    assert httpx.get(server.base + "/jobs/").status_code == 404
    assert httpx.get(server.base + "/jobs/metrics").status_code == 404


def test_a_worker_serves_its_own_metrics_beside_the_web_process_s(
    serve, start_worker, database_url
):
    web = serve("uvicorn", EXECUTE="0", METRICS="1", DATABASE_URL=database_url)
    port = free_port()
    worker = start_worker("starlette", "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    worker_metrics = f"http://127.0.0.1:{port}/metrics"

    def worker_up() -> bool:
        try:
            return httpx.get(worker_metrics, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    eventually(worker_up, timeout=30, interval=0.1)
    ids = [httpx.post(web.base + "/tiny").json()["id"] for _ in range(5)]
    for job_id in ids:
        done = httpx.get(f"{web.base}/jobs/{job_id}?wait=20", timeout=30).json()
        assert done["status"] == "succeeded"

    ran = ("deferred_jobs_finished_total", (("queue", "default"), ("status", "succeeded")))
    by_worker = scrape(worker_metrics)
    assert by_worker[ran] == 5
    assert by_worker[("deferred_job_run_seconds_count", (("queue", "default"),))] == 5
    assert by_worker.get(("deferred_jobs_accepted_total", (("queue", "default"),))) is None

    by_web = scrape(web.base + "/jobs/metrics")
    assert by_web[("deferred_jobs_accepted_total", (("queue", "default"),))] == 5
    assert by_web.get(ran) is None  # the web process ran nothing
    depth = ("deferred_jobs", (("queue", "default"), ("status", "succeeded")))
    assert by_web[depth] == by_worker[depth] == 5  # the table's depth, read by both
    assert worker.stop() == 0
