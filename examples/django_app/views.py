"""One slow view made asynchronous by one decorator, and a fast one left alone."""

import json
import os
import time

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from deferred_middleware import current_job, deferred

REPORT_SECONDS = float(os.environ.get("REPORT_SECONDS", "2"))


@csrf_exempt  # an API view; a form view keeps Django's CSRF check, replayed with the job
@require_POST
@deferred(timeout=300)
def build_report(request: HttpRequest) -> HttpResponse:
    """Slow: it would hold a worker for seconds. Deferred, it answers 202 at once."""
    params = json.loads(request.body or b"{}")
    job = current_job()
    rows = []
    for step in range(1, 5):
        time.sleep(REPORT_SECONDS / 4)
        rows.append({"region": f"region-{step}", "total": step * 1000})
        job.progress(step / 4, f"summed {step} of 4 regions")
    return JsonResponse({"report": params.get("name", "sales"), "rows": rows}, status=201)


@require_GET
def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"ok": True})
