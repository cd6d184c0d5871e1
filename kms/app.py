"""create_app(): settings -> backends -> services -> blueprints.

The HSM backend connects lazily, in the process that first uses it, so gunicorn workers
each initialise PKCS#11 after fork; nothing here touches the HSM at import or creation.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, request

from kms import config as config_mod
from kms import logs
from kms.api import admin, audit, crypto, errors
from kms.api.context import request_id
from kms.backends.hsm import HsmConfig, Pkcs11Hsm
from kms.backends.storage import SqlStorage, make_engine
from kms.backends.storage.migrate import check_current
from kms.services.audit import AuditTrail, CheckpointPolicy
from kms.services.audit_export import AuditExports
from kms.services.clock import SystemClock
from kms.services.crypto import CryptoService
from kms.services.health import HealthService
from kms.services.keys import KeyService
from kms.services.ports import Clock, Hsm, Storage
from kms.services.principals import PrincipalService

log = logging.getLogger("kms.request")


@dataclass(frozen=True)
class Services:
    principals: PrincipalService
    keys: KeyService
    crypto: CryptoService
    audit: AuditTrail
    exports: AuditExports
    health: HealthService


def build_services(
    storage: Storage,
    hsm: Hsm,
    clock: Clock | None = None,
    checkpoint_every_records: int = 1000,
) -> Services:
    clock = clock or SystemClock()
    trail = AuditTrail(storage, clock, hsm, CheckpointPolicy(checkpoint_every_records))
    return Services(
        principals=PrincipalService(storage, trail, clock),
        keys=KeyService(storage, hsm, trail, clock),
        crypto=CryptoService(storage, hsm, trail),
        audit=trail,
        exports=AuditExports(storage, trail),
        health=HealthService(storage, hsm),
    )


def start_checkpoint_timer(services: Services, every_seconds: int) -> threading.Thread | None:
    """Sign a checkpoint every ``every_seconds`` when records are unsigned (0: never).

    Runs in a daemon thread of the worker that calls it (after fork); PKCS#11 calls go
    through the backend's process-wide lock, so sharing the HSM with requests is safe."""
    if every_seconds <= 0:
        return None

    def loop() -> None:
        while True:
            time.sleep(every_seconds)
            services.audit.checkpoint_quietly()

    thread = threading.Thread(target=loop, name="audit-checkpoints", daemon=True)
    thread.start()
    return thread


def hsm_config(settings: config_mod.Settings) -> HsmConfig:
    return HsmConfig(
        module=settings.pkcs11_module,
        token_label=settings.token_label,
        pin=settings.pin,
        root_label=settings.root_key_label,
        audit_label=settings.audit_key_label,
        kek_cache_size=settings.kek_cache_size,
        softhsm2_conf=settings.softhsm2_conf,
    )


def storage_from_settings(settings: config_mod.Settings) -> SqlStorage:
    engine = make_engine(settings.database_url, settings.sqlite_synchronous)
    check_current(engine)  # refuse to start on an old schema: run `kms migrate`
    return SqlStorage(engine)


def create_app(
    settings: config_mod.Settings | None = None,
    *,
    hsm: Hsm | None = None,
    storage: Storage | None = None,
    clock: Clock | None = None,
) -> Flask:
    """The WSGI app. Backends not passed in are built from ``settings`` (default: the
    ``KMS_*`` environment)."""
    settings = settings or config_mod.from_env()
    logs.configure(settings.log_level)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["kms"] = build_services(
        storage or storage_from_settings(settings),
        hsm or Pkcs11Hsm(hsm_config(settings)),
        clock,
        settings.audit_checkpoint_records,
    )
    for bp in (admin.bp, crypto.bp, audit.bp):
        app.register_blueprint(bp)
    errors.register(app)

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = request_id()
        response.headers["Cache-Control"] = "no-store"
        caller: Any = g.get("caller")
        log.info(
            "request",
            extra={
                "request_id": request_id(),
                "principal": caller.name if caller else None,
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "ms": round(
                    (time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2
                ),
            },
        )
        return response

    return app
