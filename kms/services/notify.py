"""Webhook notifications to the data owner, through a database outbox.

An event is queued in the same transaction as the change it announces, so it is never
lost; a delivery loop (a thread in each worker, or ``kms escrow deliver``) sends due
notifications and retries failures with exponential backoff (1 s, 2 s, 4 s ... at most
5 min) until delivered or expired (when the case expires; events about no case after a
week). A receiver that is down never blocks the KMS. Every attempt is audited with the
case id, except those of ``audit_checkpoint``: each chained record would need the next
checkpoint, announced in turn, forever; those attempts are logged and kept in the outbox
row (attempts, last error).

Wire format: ``POST <url>`` with a JSON body ``{"event", "notification_id", "sent_at",
"case": {...}}`` (or ``"custodian": {...}`` for ``custodian_registered`` and
``custodian_revoked``, ``"change": {...}`` for ``change_proposed``, ``change_rejected``
and ``change_applied`` (a dual-control change, kms/services/changes.py), ``"checkpoint":
{...}`` for ``audit_checkpoint``: every signed checkpoint of the audit trail, fields as
in kms/formats/checkpoint.py, so that the data owner holds them as witness) and headers
``X-KMS-Event``, ``X-KMS-Timestamp`` (Unix seconds) and
``X-KMS-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>``.
The receiver recomputes the HMAC with the shared secret, compares in constant time, and
rejects timestamps older than a few minutes.

Acknowledgement: a notification is delivered only when the receiver answers 2xx with
``X-KMS-Ack: v1=<hex HMAC-SHA256(secret, "ack." + timestamp + "." + body)>`` over the
timestamp and body it received. A 2xx without it (a catch-all endpoint, a proxy, a
mistyped URL answered by someone else) is a failed attempt, retried like any other. So a
delivery, and the escrow waiting period it starts, proves that a holder of the webhook
secret received this very notification; the "ack." prefix keeps a receiver that echoes
the request's signature from passing (a timestamp is digits only).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Protocol

from kms.errors import KmsError
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller, EventBuilder, format_time
from kms.services.model import EscrowCase, Notification
from kms.services.ports import Clock, NotificationRows, Store, Tx

log = logging.getLogger("kms.notify")
MAX_BACKOFF_SECONDS = 300
LEASE_SECONDS = 60
CHECKPOINT_EVENT = "audit_checkpoint"


class WebhookError(Exception):
    """The receiver could not be reached (no HTTP status)."""


@dataclass(frozen=True)
class WebhookReply:
    status: int
    ack: str | None = None  # the X-KMS-Ack header, if any


class WebhookSender(Protocol):
    def post(self, url: str, body: bytes, headers: dict[str, str]) -> WebhookReply:
        """POST and return the HTTP status and X-KMS-Ack; WebhookError if there is none."""


@dataclass(frozen=True)
class WebhookSettings:
    url: str | None = None
    secret: bytes = field(default=b"", repr=False)


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-KMS-Signature`` value for a body sent at ``timestamp``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def acknowledgement(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-KMS-Ack`` value a receiver answers for a body sent at ``timestamp``."""
    mac = hmac.new(secret, b"ack." + timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def case_payload(case: EscrowCase) -> dict[str, Any]:
    """What the data owner learns about a case (everything but internal counters)."""
    return {
        "case_id": case.case_id,
        "version": case.version,
        "state": case.state.value,
        "requester": case.requester,
        "legal_basis": case.legal_basis,
        "reference": case.reference,
        "justification": case.justification,
        "scope": case.scope,
        "max_unwraps": case.max_unwraps,
        "expires_at": case.expires_at,
        "active_from": case.active_from,
        "digest": case.digest,
    }


class Notifier:
    def __init__(
        self,
        storage: Store[Tx],
        audit: AuditTrail,
        clock: Clock,
        sender: WebhookSender | None,
        settings: WebhookSettings,
    ) -> None:
        self._storage = storage
        self._audit = audit
        self._clock = clock
        self._sender = sender
        self._settings = settings
        # called inside the transaction that marks a notification delivered, with the
        # whole Tx (escrow's callback updates the case): hence a Store[Tx]
        self.on_delivered: Callable[[Tx, Notification], None] | None = None

    @property
    def configured(self) -> bool:
        return bool(self._settings.url and self._sender is not None)

    def announce(self, tx: NotificationRows, event: str, subject: dict[str, Any]) -> None:
        """Queue an event that concerns no case (a custodian registered or revoked); it is
        delivered like the others, for a week at most."""
        if not self.configured:
            log.warning("no webhook configured; notification dropped", extra={"op": event})
            return
        now = self._clock.now()
        tx.add_notification(
            Notification(
                id=0,
                case_id="",
                event=event,
                payload=json.dumps(subject, sort_keys=True),
                state="pending",
                attempts=0,
                next_attempt_at=format_time(now),
                expires_at=format_time(now + timedelta(days=7)),
            )
        )

    def checkpoint_signed(self, tx: NotificationRows, checkpoint: dict[str, Any]) -> None:
        """Queue a newly signed audit checkpoint for the data owner (the witness), in the
        transaction that stores it. Without a webhook nothing is queued; the data owner
        can still pull every checkpoint (GET /v1/audit/checkpoints, role auditor)."""
        if not self.configured:
            return  # every checkpoint, every minute: no warning each time
        self.announce(tx, CHECKPOINT_EVENT, checkpoint)

    def enqueue(self, tx: NotificationRows, case: EscrowCase, event: str) -> None:
        """Queue ``event`` about ``case`` inside the caller's transaction. Without a webhook
        nothing is queued; escrow then refuses new cases, and an approved case never starts
        its waiting period, so nothing becomes active unannounced."""
        if not self.configured:
            log.warning("no webhook configured; notification dropped", extra={"op": event})
            return
        now = format_time(self._clock.now())
        tx.add_notification(
            Notification(
                id=0,
                case_id=case.case_id,
                event=event,
                payload=json.dumps(case_payload(case), sort_keys=True),
                state="pending",
                attempts=0,
                next_attempt_at=now,
                expires_at=case.expires_at,
            )
        )

    def deliver_due(self, limit: int = 20) -> int:
        """Send what is due; returns how many were delivered. Never raises for a failed
        delivery (it is rescheduled); database errors propagate."""
        if not self.configured:
            return 0
        now = self._clock.now()
        with self._storage.transaction() as tx:
            due = tx.claim_notifications(
                format_time(now), format_time(now + timedelta(seconds=LEASE_SECONDS)), limit
            )
        return sum(self._attempt(n) for n in due)

    def deliver_quietly(self) -> None:
        try:
            self.deliver_due()
        except KmsError as e:
            log.warning("notification delivery failed", extra={"code": e.code})

    def _attempt(self, n: Notification) -> bool:
        assert self._settings.url is not None and self._sender is not None
        now = self._clock.now()
        if n.case_id:
            subject = "case"
        elif n.event.startswith("change_"):
            subject = "change"
        else:
            subject = "checkpoint" if n.event == CHECKPOINT_EVENT else "custodian"
        body = json.dumps(
            {
                "event": n.event,
                "notification_id": n.id,
                "sent_at": format_time(now),
                subject: json.loads(n.payload),
            },
            sort_keys=True,
        ).encode()
        timestamp = str(int(now.timestamp()))
        headers = {
            "Content-Type": "application/json",
            "X-KMS-Event": n.event,
            "X-KMS-Timestamp": timestamp,
            "X-KMS-Signature": signature(self._settings.secret, timestamp, body),
        }
        try:
            reply = self._sender.post(self._settings.url, body, headers)
            error = _refusal(reply, acknowledgement(self._settings.secret, timestamp, body))
        except WebhookError as e:
            error = str(e)[:200]
        attempts = n.attempts + 1
        if error is None:
            updated = replace(n, state="delivered", attempts=attempts, last_error=None)
        else:
            delay = min(2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
            retry_at = format_time(now + timedelta(seconds=delay))
            state = "expired" if retry_at >= n.expires_at else "pending"
            updated = replace(
                n, state=state, attempts=attempts, next_attempt_at=retry_at, last_error=error
            )
        event = replace(
            EventBuilder(Caller(f"notification-{n.id}", None), "webhook_delivery").event,
            case_id=n.case_id,
            outcome="ok" if error is None else "delivery_failed",
            detail=f"{n.event} attempt {attempts}" + (f": {error}" if error else ""),
        )
        with self._storage.transaction() as tx:
            tx.update_notification(updated)
            if error is None and self.on_delivered is not None:
                self.on_delivered(tx, updated)
            if n.event != CHECKPOINT_EVENT:
                self._audit.append(tx, [event])
        if n.event == CHECKPOINT_EVENT:
            log.log(
                logging.INFO if error is None else logging.WARNING,
                "checkpoint notification " + ("delivered" if error is None else "failed"),
                extra={"op": event.detail},
            )
        return error is None


def _refusal(reply: WebhookReply, expected: str) -> str | None:
    """Why ``reply`` is not a delivery (None: it is)."""
    if not 200 <= reply.status < 300:
        return f"HTTP {reply.status}"
    if reply.ack is None:
        return f"HTTP {reply.status} without X-KMS-Ack"
    if not hmac.compare_digest(reply.ack.encode("utf-8", "replace"), expected.encode("ascii")):
        return f"HTTP {reply.status} with a wrong X-KMS-Ack"
    return None
