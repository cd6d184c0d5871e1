"""Prometheus metrics of this server, all named ``kms_*``.

=============================  =========  =====================  ==========================
metric                         type       labels                 meaning
=============================  =========  =====================  ==========================
kms_requests_total             counter    operation, outcome     API operations finished
kms_request_seconds            histogram  operation              their latency (seconds)
kms_hsm_errors_total           counter    kind                   errors the HSM backend saw
kms_audit_append_seconds       histogram  (none)                 time to chain audit records
kms_rotation_due_keys          gauge      (none)                 keys due for rotation
kms_redis_errors_total         counter    use                    uses that Redis failed
kms_audit_budget_refused_total counter    role, unit             refused over audit budget
kms_audit_chain_records        gauge      (none)                 records in the audit chain
kms_audit_records_last_minute  gauge      (none)                 records chained in 1 min
kms_audit_growth_alert         gauge      (none)                 1: growth over threshold
kms_audit_checkpoint_failures_ counter    code                   checkpoints not signed
  total
kms_audit_unsigned_records     gauge      (none)                 records after the newest
                                                                 signed checkpoint
kms_audit_unsigned_refused_    counter    (none)                 operations refused: tail
  total                                                          past its bound
=============================  =========  =====================  ==========================

- ``operation``: the audited operation name of the API view (``encrypt``, ``decrypt``,
  ``create_key``, ...), a fixed set defined in kms/api.
- ``outcome``: ``ok`` for a 2xx answer, otherwise the stable error code of kms/errors.py
  (``forbidden``, ``decryption_failed``, ``hsm_unavailable``, ...).
- ``kind``: the PKCS#11 exception class of a failed HSM call (``DeviceError``,
  ``SessionHandleInvalid``, ...; a retried call counts each attempt), ``connect`` when no
  session could be opened, ``pin_rejected`` for calls refused because the PIN was rejected.
- ``kms_rotation_due_keys`` is computed from the database when /metrics is scraped; NaN if
  the database could not answer.
- ``role``: the principal's role (``service``, ``admin``, ...); ``unit``: ``requests`` or
  ``items`` (a batch of N refused over the budget counts 1 request and N items).
- ``code``: the stable error code of kms/errors.py that stopped the checkpoint
  (``hsm_unavailable``, ``storage_unavailable``, ``state_refused``, ...).
- ``kms_audit_unsigned_records`` is set by every append and checkpoint of the worker and
  by the growth sampling below; past ``KMS_AUDIT_MAX_UNSIGNED_RECORDS`` audited
  operations are refused (kms/services/audit_tail.py).
- The three ``kms_audit_*`` growth gauges are read from the chain head when /metrics is scraped
  and every few seconds by each worker (kms/services/audit_budget.py, AuditGrowth): every
  node's appends count. ``kms_audit_records_last_minute`` is a lower bound (records since
  the oldest sample of the last minute); the alert gauge compares it with
  ``KMS_AUDIT_ALERT_RECORDS_PER_MINUTE``.

Labels never hold key ids, aliases, principal names, tokens, contexts or any request data:
only the bounded sets above. The values are nevertheless usage information, so /metrics
(unauthenticated, for Prometheus) should be reachable only from the monitoring network.

Across gunicorn workers: when ``PROMETHEUS_MULTIPROC_DIR`` is set before this module is
first imported (deploy/gunicorn.conf.py does it), every worker writes its values to files
in that directory and a scrape sums them (the gauge takes the most recent value), so one
scrape answers for the whole server whichever worker serves it. Without it (tests, a
single process) the values live in this process's private registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from kms.errors import KmsError

# Our metrics only: the default registry would add process_* and python_* series.
_REGISTRY = CollectorRegistry()
# prometheus_client chose file-backed values at import if this was set; read it as it did.
_MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

REQUESTS = Counter(
    "kms_requests_total",
    "API operations finished, by operation and outcome (ok or the error code).",
    ["operation", "outcome"],
    registry=_REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "kms_request_seconds",
    "Latency of API operations, from the start of the request to the response.",
    ["operation"],
    registry=_REGISTRY,
)
HSM_ERRORS = Counter(
    "kms_hsm_errors_total",
    "Errors the HSM backend saw, by PKCS#11 exception class, connect or pin_rejected.",
    ["kind"],
    registry=_REGISTRY,
)
SEAL_FAILURES = Counter(
    "kms_seal_failures_total",
    "Database rows refused because their HSM seal does not verify, by kind (principal, "
    "token, grant, key, key_version, sigv4_credential): someone wrote the database. "
    "Alert on any increase.",
    ["kind"],
    registry=_REGISTRY,
)
AUDIT_STATE_REFUSED = Counter(
    "kms_audit_state_refused_total",
    "Times a process found the database's audit chain not extending its HSM anchor "
    "(a rollback, an old backup restored, a rewritten history): audited operations are "
    "refused until `kms audit accept-state`. Alert on any increase.",
    registry=_REGISTRY,
)
STATE_REFUSED = Counter(
    "kms_state_refused_total",
    "Times a process found the database's sealed rows matching no state the HSM "
    "anchored (a row rolled back, inserted or deleted): sealed rows are refused until "
    "`kms audit accept-state`. Alert on any increase.",
    registry=_REGISTRY,
)
AUDIT_APPEND_SECONDS = Histogram(
    "kms_audit_append_seconds",
    "Time to chain audit records in a transaction (includes waiting for the head lock).",
    registry=_REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ROTATION_DUE = Gauge(
    "kms_rotation_due_keys",
    "Enabled keys due for scheduled rotation (computed at scrape time).",
    registry=_REGISTRY,
    multiprocess_mode="mostrecent",
)


def observe_request(operation: str, outcome: str, seconds: float) -> None:
    """Count one finished API operation and record its latency."""
    REQUESTS.labels(operation, outcome).inc()
    REQUEST_SECONDS.labels(operation).observe(seconds)


def hsm_error(kind: str) -> None:
    """Count one HSM error of ``kind`` (a PKCS#11 exception class name or a fixed word)."""
    HSM_ERRORS.labels(kind).inc()


REDIS_ERRORS = Counter(
    "kms_redis_errors_total",
    "Uses of Redis that failed (or were skipped for a second after a failure), by use: "
    "nonce (request refused), rate_limit (counted per worker instead), lease, invalidation.",
    ["use"],
    registry=_REGISTRY,
)


AUDIT_BUDGET_REFUSED = Counter(
    "kms_audit_budget_refused_total",
    "Requests and items refused over their principal's audit budget (KMS_AUDIT_BUDGET).",
    ["role", "unit"],
    registry=_REGISTRY,
)
AUDIT_CHAIN_RECORDS = Gauge(
    "kms_audit_chain_records",
    "Records in the audit chain (the head's sequence number).",
    registry=_REGISTRY,
    multiprocess_mode="mostrecent",
)
AUDIT_RECORDS_LAST_MINUTE = Gauge(
    "kms_audit_records_last_minute",
    "Records chained in the last minute by every worker and node (a lower bound).",
    registry=_REGISTRY,
    multiprocess_mode="mostrecent",
)
AUDIT_GROWTH_ALERT = Gauge(
    "kms_audit_growth_alert",
    "1 while the audit chain grows faster than KMS_AUDIT_ALERT_RECORDS_PER_MINUTE.",
    registry=_REGISTRY,
    multiprocess_mode="mostrecent",
)


AUDIT_CHECKPOINT_FAILURES = Counter(
    "kms_audit_checkpoint_failures_total",
    "Audit checkpoints that could not be signed or stored, by error code: the unsigned "
    "tail grows until one is. Alert on any increase.",
    ["code"],
    registry=_REGISTRY,
)
AUDIT_UNSIGNED = Gauge(
    "kms_audit_unsigned_records",
    "Audit records appended after the newest signed checkpoint (the unsigned tail).",
    registry=_REGISTRY,
    multiprocess_mode="mostrecent",
)
AUDIT_UNSIGNED_REFUSED = Counter(
    "kms_audit_unsigned_refused_total",
    "Audited operations refused (503 hsm_unavailable) because the unsigned tail reached "
    "KMS_AUDIT_MAX_UNSIGNED_RECORDS: no checkpoint could be signed.",
    registry=_REGISTRY,
)


def redis_error(use: str) -> None:
    """Count one use of Redis (``use``: a fixed word) that could not be served by it."""
    REDIS_ERRORS.labels(use).inc()


def exposition(rotation_due: Callable[[], int]) -> tuple[bytes, str]:
    """The Prometheus text exposition of every ``kms_*`` metric (summed over all worker
    processes in multiprocess mode) and its content type. ``rotation_due`` is called now
    to refresh the gauge; if it raises a KmsError the gauge reads NaN (unknown)."""
    try:
        ROTATION_DUE.set(rotation_due())
    except KmsError:
        ROTATION_DUE.set(float("nan"))
    registry = _REGISTRY
    if _MULTIPROCESS_DIR:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, _MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST
