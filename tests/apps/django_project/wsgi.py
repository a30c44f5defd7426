"""The project's WSGI application, wrapped as a Django user would wrap it."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.apps.django_project.settings")

from django.core.wsgi import get_wsgi_application

from deferred_middleware.django import deferred_wsgi

from .._common import middleware_options

application = deferred_wsgi(get_wsgi_application(), **middleware_options())
