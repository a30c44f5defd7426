"""The example project's WSGI application, with its @deferred views deferred.

Run it:  gunicorn -w 2 --threads 4 -b 127.0.0.1:8000 examples.django_app.wsgi:application
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")

from django.core.wsgi import get_wsgi_application

from deferred_middleware.django import deferred_wsgi

application = deferred_wsgi(get_wsgi_application(), database_url=os.environ.get("DATABASE_URL"))
