"""``GET /metrics``: every process's Prometheus series, read from the multiprocess folder.

The worker writes its series as it works (``model_worker/metrics``); a scrape reads the folder
the supervisor made for this daemon (prometheus-client's ``MultiProcessCollector``), so it never
waits on the worker, works while the worker restarts, and never touches generation. The one series
this process owns is ``worker_restarts_total``: a ``Link`` to a new worker is a restart. Behind
``api_key`` like every route (``Authorization: Bearer``, as Prometheus's scrape configs send it).
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sanic import HTTPResponse, Request, Sanic

from .dialects.base import Begin, Dialect

WORKER_RESTARTS = Counter("llm_server_worker_restarts", "Model worker restarts")


def register(app: Sanic, dialect: Dialect, begin: Begin) -> None:
    """Add ``GET /metrics``, its errors and authorisation those of ``dialect``."""

    @app.get("/metrics")
    async def metrics(request: Request) -> HTTPResponse:
        _, _, early = begin(request, dialect)
        if early is not None:
            return early
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            MultiProcessCollector(registry)
        return HTTPResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
