"""The audit trail: hash-chained records appended in the caller's transaction.

Guarantees: a record is appended in the same transaction as the state change it
describes, or alone for operations that change nothing; if it cannot be written the
operation is refused (the exception propagates, the transaction rolls back, and the API
answers 503). Records never hold plaintext, key material, tokens or PINs: only names,
ids, versions, a hash of the encryption context and an error code or reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

from kms.errors import Forbidden, InvalidRequest, KmsError, StorageUnavailable
from kms.formats import audit_record
from kms.services.model import AuditEvent, Principal, Role
from kms.services.ports import Clock, Storage, Tx

log = logging.getLogger("kms.audit")
MAX_PAGE = 1000
MAX_DETAIL = 256


@dataclass(frozen=True)
class Caller:
    """Who is asking, as established by the adapter that received the request."""

    request_id: str
    principal: Principal | None

    @property
    def name(self) -> str | None:
        return self.principal.name if self.principal else None

    def require(self, *roles: Role) -> Principal:
        """The principal, if it holds one of ``roles``; Forbidden otherwise."""
        if self.principal is None or self.principal.role not in roles:
            raise Forbidden("this operation needs the role " + " or ".join(r.value for r in roles))
        return self.principal


def format_time(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


class Operation:
    """Collects what is known about one operation while it runs."""

    def __init__(self, caller: Caller, name: str) -> None:
        self.event = AuditEvent(request_id=caller.request_id, principal=caller.name, operation=name)

    def note(self, **fields: Any) -> None:
        self.event = replace(self.event, **fields)

    def ok(self, **fields: Any) -> AuditEvent:
        return replace(self.event, outcome="ok", **fields)


class AuditTrail:
    def __init__(self, storage: Storage, clock: Clock) -> None:
        self._storage = storage
        self._clock = clock

    def append(self, tx: Tx, events: Sequence[AuditEvent]) -> list[int]:
        """Chain ``events`` after the current head inside ``tx``; returns their seq numbers."""
        seq, prev = tx.audit_head()
        now = format_time(self._clock.now())
        rows = []
        for ev in events:
            seq += 1
            row: dict[str, Any] = {"v": audit_record.FORMAT_VERSION, "seq": seq, "time": now}
            row.update(asdict(ev))
            if row["detail"] is not None:
                row["detail"] = row["detail"][:MAX_DETAIL]
            row["prev_hash"] = prev
            row["hash"] = prev = audit_record.record_hash(row)
            rows.append(row)
        tx.insert_audit(rows)
        return [r["seq"] for r in rows]

    def record(self, events: Sequence[AuditEvent]) -> None:
        """Append ``events`` in a transaction of their own (raises StorageUnavailable)."""
        with self._storage.transaction() as tx:
            self.append(tx, events)

    def record_failure(self, event: AuditEvent, error: BaseException) -> None:
        """Record that an operation was refused or failed. Never raises: the caller is
        already on its way out with ``error``; a failure to record is logged."""
        if isinstance(error, KmsError):
            if error.audited:
                return
            failed = replace(event, outcome=error.code, detail=error.detail or error.message)
        else:
            failed = replace(event, outcome="internal_error", detail=type(error).__name__)
        self.record_failure_batch([failed], error)

    def record_failure_batch(self, events: Sequence[AuditEvent], error: BaseException) -> None:
        """Record already-failed ``events`` for ``error``; never raises (see record_failure)."""
        try:
            self.record(events)
        except StorageUnavailable:
            log.error("could not record a refused operation", extra={"op": events[0].operation})
            return
        if isinstance(error, KmsError):
            error.audited = True

    @contextmanager
    def operation(self, caller: Caller, name: str) -> Iterator[Operation]:
        """Run an operation; if it raises, its failure is recorded before re-raising.
        The body records success itself, inside its own transaction."""
        op = Operation(caller, name)
        try:
            yield op
        except Exception as e:
            self.record_failure(op.event, e)
            raise

    def records(self, caller: Caller, after: int, limit: int) -> list[dict[str, Any]]:
        """One page of records in chain order, for admins and auditors."""
        with self.operation(caller, "read_audit"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            if after < 0 or not 1 <= limit <= MAX_PAGE:
                raise InvalidRequest(f"after must be >= 0 and limit 1..{MAX_PAGE}")
            with self._storage.reader() as tx:
                return tx.audit_records(after, limit)
