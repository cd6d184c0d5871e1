"""Request metrics and the Prometheus scrape endpoint ``GET /metrics``.

Every request to an audited operation (a view marked with ``context.operation``) is
counted once, labelled with the operation name and its outcome: ``ok`` for a 2xx answer,
otherwise the error code the error handler answered with. Requests outside the audited
operations (/healthz, /readyz, /metrics itself, unknown paths) are not counted.

``/metrics`` is unauthenticated, as Prometheus scrapes it; it is not an audited operation
and writes no audit record. It exposes only the counters of kms/metrics.py, whose labels
are bounded names and codes (no key id, principal, token or request data). Restrict it to
the monitoring network anyway (firewall or reverse-proxy rule): usage volumes and error
rates are still information about the deployment.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g

from kms import metrics
from kms.api.context import services


def install(app: Flask) -> None:
    """Count and time every audited operation of ``app`` and serve ``GET /metrics``."""
    app.before_request(_start)
    app.after_request(_finish)
    app.add_url_rule("/metrics", "metrics", _scrape, methods=["GET"])


def _start() -> None:
    g.metrics_started = time.perf_counter()


def _finish(response: Response) -> Response:
    operation = g.get("operation")
    if operation is not None:
        if 200 <= response.status_code < 300:
            outcome = "ok"
        else:
            outcome = g.get("error_code") or f"http_{response.status_code}"
        started = g.get("metrics_started", time.perf_counter())
        metrics.observe_request(operation, outcome, time.perf_counter() - started)
    return response


def _scrape() -> Response:
    services().audit_growth.sample_quietly()  # the audit growth gauges, fresh
    body, content_type = metrics.exposition(services().keys.rotation_due_count)
    return Response(body, content_type=content_type)
