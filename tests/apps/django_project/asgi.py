"""The project's ASGI application, wrapped as a Django user would wrap it."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.apps.django_project.settings")

from django.core.asgi import get_asgi_application

from deferred_middleware.django import deferred_asgi

from .._common import middleware_options

application = deferred_asgi(get_asgi_application(), **middleware_options())
