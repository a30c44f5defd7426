"""A Flask app with one slow view made asynchronous by one decorator.

Run it:  gunicorn -w 2 --threads 4 -b 127.0.0.1:8000 examples.flask_app.app:app
"""

import os
import time

from flask import Flask, jsonify, request

from deferred_middleware import current_job, deferred
from deferred_middleware.flask import FlaskDeferred

REPORT_SECONDS = float(os.environ.get("REPORT_SECONDS", "2"))

app = Flask(__name__)


@app.post("/reports")
@deferred(timeout=300)
def build_report():
    """Slow: it would hold a worker for seconds. Deferred, it answers 202 at once."""
    params = request.get_json(silent=True) or {}
    job = current_job()
    rows = []
    for step in range(1, 5):
        time.sleep(REPORT_SECONDS / 4)
        rows.append({"region": f"region-{step}", "total": step * 1000})
        job.progress(step / 4, f"summed {step} of 4 regions")
    return jsonify(report=params.get("name", "sales"), rows=rows), 201


@app.get("/health")
def health():
    """Fast: left alone, it passes through the middleware untouched."""
    return jsonify(ok=True)


FlaskDeferred(app, database_url=os.environ.get("DATABASE_URL"))
