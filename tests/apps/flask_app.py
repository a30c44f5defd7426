"""The Flask app the integration tests serve with gunicorn and Flask's dev server."""

import gc

from flask import Flask, Response, jsonify, request, stream_with_context

from deferred_middleware import current_job, deferred
from deferred_middleware.flask import FlaskDeferred

from ._common import BINARY, STREAM_CHUNKS, middleware_options, record_effect, wait_gate

app = Flask(__name__)


def _report():
    job = current_job()
    record_effect(job.id, job.attempt)
    body = request.get_data()
    job.progress(0.5, "halfway")
    wait_gate(request.args.get("gate"))
    response = jsonify(
        echo=body.decode(),
        authorization=request.headers.get("authorization"),
        job=job.id,
        attempt=job.attempt,
    )
    response.status_code = 201
    response.set_cookie("first", "1")
    response.set_cookie("second", "2")
    return response


# The marker above the route decorator...
@deferred
@app.post("/report")
def report():
    return _report()


# ...and below it: both work.
@app.post("/report-retry")
@deferred(retries=1)
def report_retry():
    return _report()


@app.post("/sync-report")
@deferred
def sync_report():
    job = current_job()
    record_effect(job.id, job.attempt)
    job.progress(0.25, "sync")
    wait_gate(request.args.get("gate"))
    return jsonify(sync=True, job=job.id)


@app.post("/tiny")
@deferred
def tiny():
    job = current_job()
    record_effect(job.id, job.attempt)
    return "ok"


@app.post("/maybe")
@deferred(mode="prefer")
def maybe():
    try:
        job_id = current_job().id
    except LookupError:
        job_id = None
    return jsonify(job=job_id)


@app.post("/nightly")
@deferred(queue="nightly")
def nightly():
    job = current_job()
    record_effect(job.id, job.attempt)
    return "nightly"


@app.post("/binary")
@deferred
def binary():
    return Response(BINARY, mimetype="application/octet-stream", headers={"x-kind": "binary"})


@app.post("/stream")
@deferred
def stream():
    return Response(stream_with_context(iter(STREAM_CHUNKS)), mimetype="text/plain")


@app.post("/missing")
@deferred
def missing():
    return jsonify(detail="no such thing"), 404


@app.post("/boom")
@deferred
def boom():
    raise RuntimeError("secret-token-123 leaked from the database")


@app.post("/too-slow")
@deferred(timeout=0.5)
def too_slow():
    wait_gate("never-opened", deadline=3)
    return "late"


@app.post("/frozen")
@deferred
def frozen():
    """How many objects the process has frozen out of garbage collection."""
    return jsonify(frozen=gc.get_freeze_count())


@app.post("/echo")
def echo():
    return Response(request.get_data(), mimetype="application/octet-stream")


@app.get("/stream-plain")
def stream_plain():
    return Response(iter(STREAM_CHUNKS), mimetype="text/plain")


@app.get("/health")
def health():
    return jsonify(ok=True)


FlaskDeferred(app, **middleware_options())
