"""create_app(): settings -> backends -> services -> blueprints.

The HSM backend connects lazily, in the process that first uses it, so gunicorn workers
each initialise PKCS#11 after fork; nothing here touches the HSM at import or creation.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, g, request

from kms import config as config_mod
from kms import logs
from kms.api import (
    admin,
    audit,
    aws_kms,
    crypto,
    errors,
    escrow,
    sigv4,
    throttle,
    xks,
)
from kms.api import changes as changes_api
from kms.api import metrics as metrics_api
from kms.api import openapi as openapi_api
from kms.api import principals as principals_api
from kms.api.context import request_id
from kms.backends.hsm import HsmConfig, Pkcs11Hsm
from kms.backends.redis_store import shared_backends
from kms.backends.storage import SqlStorage, make_engine
from kms.backends.storage.migrate import check_current_if_reachable
from kms.backends.webhook import RequestsWebhookSender
from kms.services.audit import AuditTrail, CheckpointPolicy
from kms.services.audit_budget import (
    DEFAULT_ALERT_RECORDS_PER_MINUTE,
    FLUSH_SECONDS,
    AuditBudget,
    AuditGrowth,
)
from kms.services.audit_context import ContextAudit
from kms.services.audit_events import Caller
from kms.services.audit_export import AuditExports
from kms.services.aws_kms import AwsKeyService
from kms.services.change_model import ControlPolicy
from kms.services.changes import ChangeService
from kms.services.clock import SystemClock
from kms.services.cluster import BlindRewrapFailures, Cluster, ClusterSettings, Invalidations
from kms.services.context_hash import ContextHasher
from kms.services.crypto import CryptoService
from kms.services.custodians import CustodianService
from kms.services.dashboard import DashboardService
from kms.services.escrow import EscrowService
from kms.services.escrow_common import EscrowRows, EscrowSettings
from kms.services.health import HealthService
from kms.services.hsm_port import Hsm
from kms.services.key_work import KeyUseRunner
from kms.services.keys import KeyService
from kms.services.lookup_cache import LookupCache
from kms.services.model import EscrowPolicy, Role
from kms.services.notify import Notifier, WebhookSettings
from kms.services.ports import Clock, Storage
from kms.services.principals import PrincipalService
from kms.services.rotation import SCHEDULER
from kms.services.seals import RowSeals
from kms.services.sigv4 import SigV4Service
from kms.services.state_index import StateIndex
from kms.services.xks import XksService
from kms.web import dashboard as web_dashboard
from kms.web import dashboard_changes as web_changes  # noqa: F401 (views on web_dashboard.bp)
from kms.web import dashboard_principals  # noqa: F401 (its views are on web_dashboard.bp)

log = logging.getLogger("kms.request")


@dataclass(frozen=True)
class Services:
    principals: PrincipalService
    keys: KeyService
    crypto: CryptoService
    audit: AuditTrail
    exports: AuditExports
    audit_context: ContextAudit
    escrow: EscrowService
    custodians: CustodianService
    notifier: Notifier
    health: HealthService
    sigv4: SigV4Service
    cluster: Cluster
    dashboard: DashboardService
    aws: AwsKeyService
    xks: XksService
    audit_growth: AuditGrowth
    state: StateIndex  # the freshness of sealed rows (kms/services/state_index.py)
    changes: ChangeService  # dual control of the control plane


@dataclass(frozen=True)
class Options:
    """Service-layer settings (the parts of config.Settings the services need)."""

    auth_cache_seconds: float = 0.0
    lookup_cache_seconds: float = 0.0
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    escrow: EscrowSettings = field(default_factory=EscrowSettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    audit_alert_per_minute: int = DEFAULT_ALERT_RECORDS_PER_MINUTE
    token_max_lifetimes: Mapping[Role, int] = field(default_factory=dict)  # seconds
    control: ControlPolicy = field(default_factory=ControlPolicy)  # pinned at first start


def options_from_settings(settings: config_mod.Settings) -> Options:
    return Options(
        settings.auth_cache_seconds,
        settings.lookup_cache_seconds,
        CheckpointPolicy(
            settings.audit_checkpoint_records,
            settings.audit_max_unsigned_records,
            settings.audit_max_unsigned_seconds,
        ),
        EscrowSettings(
            EscrowPolicy(
                settings.escrow_quorum,
                settings.escrow_required_groups,
                settings.escrow_veto_groups,
            ),
            settings.escrow_waiting_period_seconds,
            settings.escrow_approval_ttl_seconds,
            endorsed_enrolment=settings.escrow_endorsed_enrolment,
            groups=settings.escrow_groups,
        ),
        WebhookSettings(settings.escrow_webhook_url, settings.escrow_webhook_secret),
        ClusterSettings(
            settings.redis_url,
            settings.redis_timeout_ms,
            settings.rate_limits,
            settings.audit_budget,
            settings.blind_rewrap_failures,
        ),
        settings.audit_alert_records_per_minute,
        {Role(r): seconds for r, seconds in settings.token_max_lifetimes.items()},
        ControlPolicy(
            settings.control_mode,
            settings.change_quorum,
            settings.escrow_required_groups | settings.escrow_veto_groups
            if settings.change_required_groups is None
            else settings.change_required_groups,
            settings.change_ttl_seconds,
        ),
    )


def build_services(
    storage: Storage,
    hsm: Hsm,
    clock: Clock | None = None,
    options: Options = Options(),
) -> Services:
    clock = clock or SystemClock()
    trail = AuditTrail(storage, clock, hsm, options.checkpoint)
    sender = RequestsWebhookSender() if options.webhook.url else None
    notifier = Notifier(storage, trail, clock, sender, options.webhook)
    trail.on_checkpoint = notifier.checkpoint_signed  # every checkpoint to the data owner
    seals = RowSeals(hsm)  # one memo of verified rows per worker
    storage.seal_with(seals)  # and one index of the current seals (seals.state)
    assert seals.state is not None
    trail.sealed_state = seals.state  # checked and carried by every checkpoint
    rows = EscrowRows(seals)
    escrow = EscrowService(storage, trail, clock, notifier, options.escrow, rows)
    notifier.on_delivered = escrow.delivered
    changes = ChangeService(storage, trail, clock, notifier, rows, options.control, options.escrow)
    custodians = CustodianService(
        storage, trail, clock, notifier, options.escrow, rows, changes=changes
    )
    principals = PrincipalService(
        storage,
        trail,
        clock,
        options.auth_cache_seconds,
        seals.state.version,
        options.token_max_lifetimes,
        custodians.needed_member,
        changes=changes,
    )
    keys = KeyService(storage, hsm, trail, clock, changes=changes)
    exports = AuditExports(storage, trail)
    contexts = ContextHasher(hsm)  # keyed context hashes, one memo per worker
    shared = shared_backends(options.cluster.redis_url, options.cluster.redis_timeout_ms)
    invalidations = Invalidations(shared.bus)
    cluster = Cluster(
        shared.limiter,
        options.cluster.rate_limits,
        shared.leases,
        invalidations,
        hsm,
        AuditBudget(shared.limiter, options.cluster.audit_budget, trail, clock),
    )
    # One cache of immutable KEK rows and provisional admissions per worker, for every face.
    runner = KeyUseRunner(
        storage, trail, LookupCache(options.lookup_cache_seconds), escrow, admission=cluster
    )
    return Services(
        principals=principals,
        keys=keys,
        crypto=CryptoService(
            hsm,
            runner,
            contexts=contexts,
            blind=BlindRewrapFailures(shared.limiter, options.cluster.blind_rewrap_failures),
        ),
        audit=trail,
        exports=exports,
        audit_context=ContextAudit(storage, trail, contexts),
        escrow=escrow,
        custodians=custodians,
        notifier=notifier,
        health=HealthService(
            storage, hsm, trail.verify_anchor, lambda: seals.state and seals.state.sync()
        ),
        sigv4=SigV4Service(
            storage,
            hsm,
            trail,
            clock,
            options.auth_cache_seconds,
            shared.nonces,
            invalidations,
            seals.state.version,
            changes=changes,
        ),
        cluster=cluster,
        dashboard=DashboardService(storage, hsm, trail, principals, keys, exports, clock, rows),
        aws=AwsKeyService(storage, trail),
        xks=XksService(storage, hsm, trail, clock, runner, changes=changes),
        changes=changes,
        audit_growth=AuditGrowth(storage, clock, options.audit_alert_per_minute),
        state=seals.state,
    )


def start_background(services: Services, settings: config_mod.Settings) -> None:
    """Per-worker loops (started after fork, by kms.wsgi): timed audit checkpoints, the
    scheduler, the database's log upkeep and webhook delivery. PKCS#11 calls go through
    the backend's process-wide lock. First, the worker's index of current seals starts
    to build (kms/services/state_index.py), in the background too."""
    services.state.warm()
    try:
        services.changes.pin()  # and log the mode
    except Exception:  # the database or HSM is not up yet: pinned at first use
        logging.getLogger("kms.changes").exception("control policy not read at start")
    _every(settings.audit_checkpoint_seconds, services.audit.checkpoint_quietly, "checkpoints")
    _every(0.5, services.health.storage_upkeep, "wal-checkpoint")
    _every(5, services.sigv4.prune_nonces, "nonce-prune")
    if services.cluster.budget is not None:
        _every(FLUSH_SECONDS, services.cluster.budget.flush, "audit-budget")
    _every(FLUSH_SECONDS, services.audit_growth.sample_quietly, "audit-growth")
    _every(settings.scheduler_seconds, lambda: _run_due(services), "scheduler")
    if services.notifier.configured:
        _every(1, services.notifier.deliver_quietly, "notifications")


def _run_due(services: Services) -> None:
    """One scheduler pass (rotations and destructions that are due); every worker runs it,
    each change happens once (KeyService.run_due); with Redis, one pass at a time."""
    caller = Caller(f"scheduler-{uuid.uuid4().hex}", SCHEDULER)
    run = services.cluster.scheduler_pass(services.keys, caller)
    if run is not None and (run.rotated or run.destroyed or run.failed):
        logging.getLogger("kms.scheduler").info(
            "scheduler run",
            extra={
                "op": f"rotated={len(run.rotated)} destroyed={len(run.destroyed)} "
                f"failed={len(run.failed)}"
            },
        )


def _every(seconds: float, task: Callable[[], None], name: str) -> None:
    if seconds <= 0:
        return

    def loop() -> None:
        while True:
            time.sleep(seconds)
            try:
                task()
            except Exception:  # a background loop must outlive any one failure
                logging.getLogger("kms.background").exception("task failed", extra={"op": name})

    threading.Thread(target=loop, name=name, daemon=True).start()


def hsm_config(settings: config_mod.Settings) -> HsmConfig:
    return HsmConfig(
        module=settings.pkcs11_module,
        token_label=settings.token_label,
        pin=settings.pin,
        root_label=settings.root_key_label,
        audit_label=settings.audit_key_label,
        kek_cache_size=settings.kek_cache_size,
        softhsm2_conf=settings.softhsm2_conf,
        wrap_mechanism=settings.hsm_wrap_mechanism,
        gcm_iv=settings.hsm_gcm_iv,
        unwrap_template=settings.hsm_unwrap_template,
        anchor_object=settings.hsm_anchor_object,
    )


def storage_from_settings(settings: config_mod.Settings) -> SqlStorage:
    """The storage backend; refuses to start on an old schema (run ``kms migrate``), but
    starts while the database does not answer (503 until it does)."""
    engine = make_engine(settings.database_url, settings.sqlite_synchronous)
    try:
        check_current_if_reachable(engine)
    except BaseException:
        engine.dispose()
        raise
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
        options_from_settings(settings),
    )
    xks_bp = xks.blueprint(settings.xks_uri_prefix, settings.xks_region)  # URLs: the prefix
    for bp in (
        admin.bp,
        changes_api.bp,
        principals_api.bp,
        crypto.bp,
        audit.bp,
        escrow.bp,
        sigv4.bp,
        xks_bp,
    ):
        app.register_blueprint(bp)
    app.register_blueprint(web_dashboard.bp, settings=settings)
    app.register_blueprint(aws_kms.bp, settings=settings)  # POST / (X-Amz-Target)
    app.register_blueprint(openapi_api.bp)  # GET /v1/openapi.json
    metrics_api.install(app)
    throttle.install(app)
    errors.register(app)

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = request_id()
        response.headers["Cache-Control"] = "no-store"
        if not log.isEnabledFor(logging.INFO):
            return response
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
