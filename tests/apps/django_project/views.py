"""Views of the Django test project: deferred ones (a function and a class)
and plain ones, which pass through untouched."""

import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import View
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from deferred_middleware import current_job, deferred

from .._common import record_effect, wait_gate


@csrf_exempt
@require_POST
@deferred
def report(request: HttpRequest) -> HttpResponse:
    job = current_job()
    record_effect(job.id, job.attempt)
    job.progress(0.5, "halfway")
    wait_gate(request.GET.get("gate"))
    body = json.loads(request.body or b"{}")
    return JsonResponse({"echo": body, "job": job.id, "via": "django"}, status=201)


@deferred(queue="nightly")
class Nightly(View):
    def post(self, request: HttpRequest) -> HttpResponse:
        job = current_job()
        record_effect(job.id, job.attempt)
        return HttpResponse(b"nightly", content_type="text/plain")


@csrf_exempt
def plain(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.body, content_type="application/octet-stream")


def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"ok": True})
