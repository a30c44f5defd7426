"""The example project's ASGI application, with its @deferred views deferred.

Run it:  uvicorn examples.django_app.asgi:application --port 8000
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")

from django.core.asgi import get_asgi_application

from deferred_middleware.django import deferred_asgi

application = deferred_asgi(get_asgi_application(), database_url=os.environ.get("DATABASE_URL"))
