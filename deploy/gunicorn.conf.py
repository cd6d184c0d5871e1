"""gunicorn settings for the KMS (``kms serve`` passes --bind and --workers).

- sync workers, one thread each: PKCS#11 modules are not thread-safe as python-pkcs11
  initialises them, so scale with processes;
- no preload_app: each worker initialises PKCS#11 itself, after fork;
- bounded timeouts so a slow or stuck client cannot hold a worker for long.
"""

worker_class = "sync"
threads = 1
preload_app = False
timeout = 30
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
