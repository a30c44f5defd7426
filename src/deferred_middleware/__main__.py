"""python -m deferred_middleware: the same commands as deferred-middleware."""

from .cli import main

main()
