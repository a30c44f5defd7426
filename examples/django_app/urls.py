from django.urls import path

from . import views

urlpatterns = [path("reports", views.build_report), path("health", views.health)]
