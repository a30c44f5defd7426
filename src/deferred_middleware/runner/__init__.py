"""Replaying stored requests into ASGI and WSGI apps, and running them as jobs."""
