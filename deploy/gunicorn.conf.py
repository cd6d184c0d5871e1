"""gunicorn settings for the KMS (``kms serve`` passes --bind and --workers).

- sync workers, one thread each: PKCS#11 modules are not thread-safe as python-pkcs11
  initialises them, so scale with processes;
- no preload_app: each worker initialises PKCS#11 itself, after fork;
- bounded timeouts so a slow or stuck client cannot hold a worker for long;
- Prometheus multiprocess mode: the master gives the workers one private, empty directory
  for their metric files (``$KMS_METRICS_DIR``, else a temporary directory removed at
  exit) in ``PROMETHEUS_MULTIPROC_DIR``, so a scrape of /metrics sums every worker. One
  directory per server: it is wiped when the server starts.
"""

import os
import shutil
import tempfile
from pathlib import Path

# Set by on_starting to the temporary metrics directory it made (survives a config reload).
_MADE_HERE = "KMS_METRICS_TMPDIR"


def _worker_timeout() -> int:
    """KMS_WORKER_TIMEOUT (seconds, 1..600; default 30): see deploy/README.md, "Slow clients
    and the worker timeout"."""
    raw = os.environ.get("KMS_WORKER_TIMEOUT", "") or "30"
    if not raw.isdigit() or not 1 <= int(raw) <= 600:
        raise SystemExit("KMS_WORKER_TIMEOUT must be a whole number of seconds, 1 to 600")
    return int(raw)


worker_class = "kms.gunicorn_worker.KmsSyncWorker"  # sync, with clean timeouts
threads = 1
preload_app = False
timeout = _worker_timeout()
graceful_timeout = 20
keepalive = 2
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# Access log without query strings or headers (no tokens); the app logs JSON per request.
accesslog = None
errorlog = "-"
loglevel = "info"
# gunicorn >= 24 opens a runtime control socket by default; the KMS does not use it and
# several servers on one host must not share its path.
control_socket_disable = True


def worker_exit(server, worker):  # type: ignore[no-untyped-def]
    """On a clean stop, sign a checkpoint so the unsigned tail is as short as possible,
    and log the worker's KEK cache counters."""
    services = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("kms")
    if services is not None:
        services.audit.checkpoint_quietly()
        import json

        print(
            json.dumps(
                {"msg": "worker stats", "pid": worker.pid, **services.health.worker_stats()}
            ),
            flush=True,
        )


def on_starting(server):  # type: ignore[no-untyped-def]
    """In the master, once, before any worker exists (workers import prometheus_client
    after fork, so they all see the directory): a private (0700), empty metrics directory.
    Any inherited PROMETHEUS_MULTIPROC_DIR is replaced."""
    configured = os.environ.get("KMS_METRICS_DIR")
    os.environ.pop(_MADE_HERE, None)  # only ever remove a directory made below
    if configured:
        path = Path(configured)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)
        for stale in path.glob("*.db"):  # a previous run's values must not be summed in
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="kms-metrics-"))
        os.environ[_MADE_HERE] = str(path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """In the master, after a worker exits: drop its live-only gauge files (its counters
    and histograms stay, so totals never go down when a worker is replaced)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):  # type: ignore[no-untyped-def]
    """Remove the metrics directory if this master made it (not a KMS_METRICS_DIR)."""
    path = os.environ.get(_MADE_HERE)
    if path:
        shutil.rmtree(path, ignore_errors=True)
