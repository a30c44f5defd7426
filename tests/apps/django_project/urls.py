from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

from . import views

api = [path("report", views.report), path("nightly", csrf_exempt(views.Nightly.as_view()))]

urlpatterns = [
    path("api/", include(api)),
    path("plain", views.plain),
    path("health", views.health),
]
