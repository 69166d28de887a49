"""The HTTP process: Sanic, request validation, and the table of requests waiting on the worker."""
