"""The audit of one request: operations, and the one record of a refused or failed one
(kms/services/audit.py's AuditTrail is made of this and the chain itself).

Guarantees: every operation that fails or is refused leaves exactly one record, written
by the outermost operation of the request, except failed authentication (logged by the
face), refusals over the audit budget (coalesced, kms/services/audit_budget.py) and
refusals because the unsigned tail is full (counted and logged, never chained:
kms/services/audit_tail.py). A failure to record is logged, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace

from kms.errors import (
    AuditBudgetExceeded,
    AuditStateRefused,
    ChangeProposed,
    HsmUnavailable,
    KmsError,
    StorageUnavailable,
    Unauthenticated,
    UnsignedTailFull,
)
from kms.services.audit_events import Caller, EventBuilder, local_event
from kms.services.model import AuditEvent

log = logging.getLogger("kms.audit")


class _Scope:
    """The audit of one request: its innermost operation so far."""

    def __init__(self, op: EventBuilder) -> None:
        self.op = op


# The request being served in this context (a thread, a gunicorn sync worker's request).
_scope: ContextVar[_Scope | None] = ContextVar("kms_audit_scope", default=None)


def in_operation() -> bool:
    """Whether an operation of this context's request is running."""
    return _scope.get() is not None


class Operations:
    """The request scoping of AuditTrail, which provides record() and _sign_if_full()."""

    def record(self, events: Sequence[AuditEvent]) -> None:
        raise NotImplementedError

    def _sign_if_full(self) -> None:
        raise NotImplementedError

    @contextmanager
    def operation(self, caller: Caller, name: str) -> Iterator[EventBuilder]:
        """Run an operation; the body records its success itself, inside its own
        transaction. Failures are recorded once per request: by the outermost operation,
        with the innermost builder entered (the most specific fields), unless that
        builder's records were already written. An operation inside another joins it."""
        op = EventBuilder(caller, name)
        outer = _scope.get()
        if outer is not None:
            op._describe = outer.op._describe  # the request's way of describing failures
            outer.op = op
            yield op
            return
        self._sign_if_full()  # the HSM may be back: try before anything is done
        scope = _Scope(op)
        token = _scope.set(scope)
        try:
            yield op
        except Exception as e:
            self._record_failure(scope.op, e)
            raise
        finally:
            _scope.reset(token)

    def _record_failure(self, op: EventBuilder, error: BaseException) -> None:
        """Record that an operation was refused or failed. Never raises: the caller is
        already on its way out with ``error``; a failure to record is logged. Failed
        authentication is logged, not chained: it is not attributable to a principal,
        and chaining it would let anyone grow the audit trail."""
        if op.written:
            return
        if isinstance(error, Unauthenticated):
            return  # logged by the face that authenticates
        if isinstance(error, AuditBudgetExceeded):
            return  # coalesced by kms/services/audit_budget.py
        if isinstance(error, ChangeProposed):
            return  # not a failure: its propose_change record was written with the change
        if isinstance(error, UnsignedTailFull):
            return  # never chained, so they cannot grow the tail (audit_tail.py)
        if isinstance(error, KmsError):
            code, detail = error.code, error.detail or error.message
        else:
            code, detail = "internal_error", type(error).__name__
        ops, unreached = op.failure or ([op], 0)
        failed = [o.failed(code, detail) for o in ops]
        failed += [replace(op.event, outcome=code, detail="batch aborted")] * unreached
        try:
            self.record(failed)
        except (StorageUnavailable, AuditStateRefused, HsmUnavailable):
            log.error("could not record a refused operation", extra={"op": failed[0].operation})

    def record_alarm(self, operation: str, error: KmsError) -> None:
        """Chain that a database row failed its HSM seal where no principal can be named
        (authentication): ``error``'s code and precise detail, no principal. Never raises
        (the caller is refusing already); a failure to record is logged."""
        try:
            self.record([local_event(operation, error.detail, outcome=error.code)])
        except KmsError:
            log.error("could not record an integrity alarm", extra={"detail": error.detail})
