"""The unsigned tail of the audit chain: the records appended since the newest signed
checkpoint, which the database writer could still rewrite unnoticed.

Guarantees (kms/services/audit.py applies them in AuditTrail.append_drafts, the one
place every chained record of an operation passes through):

- A checkpoint that fails to be signed is an alarm: ``kms_audit_checkpoint_failures_total``
  rises (by error code) and an ERROR line with the code is logged; never a secret.
- The tail never grows past ``max_unsigned`` records, nor stays unsigned for long: an
  append that would take it past the bound, or that comes more than ``max_seconds``
  after this process first failed to sign a checkpoint (with no checkpoint signed since,
  and records unsigned), is refused with 503 ``hsm_unavailable`` (UnsignedTailFull) and
  nothing of its transaction is kept. ``kms_audit_unsigned_refused_total`` counts the
  refusals. Every worker tries to sign on its timer (KMS_AUDIT_CHECKPOINT_SECONDS), so
  each finds out within that time plus ``max_seconds``.
- Refusals over the bound are not chained (not even as refusals), so they cannot grow
  the tail: each is counted and logged at ERROR instead, as a refusal that could not be
  recorded when the database is down. Any other refusal while the tail is full is
  likewise only logged (its record is refused by the same bound).
- A worker that saw the tail full tries to sign a checkpoint once before each later
  operation: when the HSM is back the operation goes through, without a restart. The
  timed checkpoints (KMS_AUDIT_CHECKPOINT_SECONDS) also keep trying without traffic.

Operator commands that repair the chain (``kms init`` anchoring it, ``kms audit
accept-state``) are not bounded: they sign at once anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kms.errors import KmsError, UnsignedTailFull
from kms.metrics import AUDIT_CHECKPOINT_FAILURES, AUDIT_UNSIGNED, AUDIT_UNSIGNED_REFUSED
from kms.services.model import AuditHead

log = logging.getLogger("kms.audit")

# Ten times the default checkpoint policy (KMS_AUDIT_CHECKPOINT_RECORDS=1000): the alarm
# goes off at the first failed signature (1,000 records), and 9,000 more records of
# headroom ride out a reconnect or an HSM failover without refusing anyone, while what
# the database writer could rewrite unnoticed stays bounded (a few MB of records).
DEFAULT_MAX_UNSIGNED = 10_000
# Ten times the default timer (KMS_AUDIT_CHECKPOINT_SECONDS=60): long enough for an HSM
# failover, short enough that an outage of the audit key is not an unsigned day.
DEFAULT_MAX_UNSIGNED_SECONDS = 600


class UnsignedTail:
    """This process's view of the unsigned tail and the bound on it."""

    def __init__(
        self,
        max_unsigned: int = DEFAULT_MAX_UNSIGNED,
        max_seconds: float = DEFAULT_MAX_UNSIGNED_SECONDS,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_unsigned < 1:
            raise ValueError("max_unsigned must be at least 1")
        self.max_unsigned = max_unsigned
        self.max_seconds = max_seconds
        self._now = now
        self._failing_since: float | None = None  # first failed signature since a success
        self._full = False  # this process last saw the tail at its bound
        self._lock = threading.Lock()

    def admit(self, head: AuditHead, count: int) -> None:
        """Return if ``count`` more records after ``head`` keep the tail within the bound;
        otherwise count and log the refusal and raise UnsignedTailFull."""
        unsigned = head.seq - head.checkpoint_seq
        since = self._failing_since
        failing_for = 0.0 if since is None or unsigned == 0 else self._now() - since
        if unsigned + count <= self.max_unsigned and failing_for <= self.max_seconds:
            return
        self._full = True
        AUDIT_UNSIGNED.set(unsigned)
        AUDIT_UNSIGNED_REFUSED.inc()
        if failing_for > self.max_seconds:
            detail = (
                f"{unsigned} audit records unsigned and checkpoints failing for "
                f"{failing_for:.0f} s, past {self.max_seconds:.0f} s "
                "(KMS_AUDIT_MAX_UNSIGNED_SECONDS)"
            )
        else:
            detail = (
                f"{unsigned} audit records unsigned, {count} more would pass the bound of "
                f"{self.max_unsigned} (KMS_AUDIT_MAX_UNSIGNED_RECORDS)"
            )
        log.error(
            "audited operation refused: the audit tail cannot be signed",
            extra={"code": UnsignedTailFull.code, "detail": detail},
        )
        raise UnsignedTailFull(detail=detail)

    def appended(self, unsigned: int) -> None:
        """``unsigned`` records are unsigned after an append (or a reading of the head)."""
        self._full = unsigned >= self.max_unsigned
        AUDIT_UNSIGNED.set(unsigned)

    def wants_signature(self, unsigned: int, every_records: int) -> bool:
        """Whether a checkpoint is due with ``unsigned`` records unsigned: by the count
        policy (``every_records``, 0: never by count), and in any case once half the bound
        is unsigned, so a server signing only by time does not refuse while healthy."""
        by_count = bool(every_records) and unsigned >= every_records
        return by_count or unsigned >= (self.max_unsigned + 1) // 2

    def full(self) -> bool:
        """Whether this process last saw the tail at its bound (try to sign first)."""
        return self._full

    def signed(self, unsigned: int) -> None:
        """A checkpoint is stored; ``unsigned`` records follow it now."""
        self._failing_since = None
        self.appended(unsigned)

    def sign_failed(self, error: KmsError) -> None:
        """The alarm of a checkpoint that could not be signed (or stored)."""
        if self._failing_since is None:
            self._failing_since = self._now()
        AUDIT_CHECKPOINT_FAILURES.labels(error.code).inc()
        log.error(
            "audit checkpoint failed: the unsigned tail grows until it can be signed",
            extra={"code": error.code, "detail": error.detail},
        )

    def recovery(self) -> threading.Lock:
        """Held while trying to sign before an operation (one attempt at a time per
        process: concurrent requests wait for it rather than each asking the HSM)."""
        return self._lock
