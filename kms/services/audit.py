"""The audit trail: hash-chained records appended in the caller's transaction, and
checkpoints of the chain head signed by the HSM's audit key.

Guarantees: a record is appended in the same transaction as the state change it
describes, or alone for operations that change nothing; if it cannot be written the
operation is refused (the exception propagates, the transaction rolls back, and the API
answers 503). Records never hold plaintext, key material, tokens or PINs: only names,
ids, versions, a hash of the encryption context and an error code or reason. Appends are
serialised by the database (the head row is locked), so the chain is one linear sequence
whatever the number of workers or nodes.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from kms.errors import Forbidden, InvalidRequest, KmsError, StorageUnavailable, Unauthenticated
from kms.formats import audit_record
from kms.formats import checkpoint as cpfmt
from kms.metrics import AUDIT_APPEND_SECONDS
from kms.services.model import AuditEvent, AuditQuery, Principal, Role
from kms.services.ports import AuditRows, Clock, Hsm, NonceRows, Store

log = logging.getLogger("kms.audit")
MAX_PAGE = 1000
MAX_DETAIL = 256


class Claim(Protocol):
    """Something the request's authentication still has to record, in the transaction
    that commits the request's audit records (see kms/services/sigv4.py, DeferredNonce)."""

    def claim(self, tx: NonceRows) -> None:
        """Record it; raise Unauthenticated (nothing is then committed) if it cannot be."""
        ...


@dataclass(frozen=True)
class Caller:
    """Who is asking, as established by the adapter that received the request; ``claim``
    is what its authentication left to record at commit (a SigV4 signature's nonce)."""

    request_id: str
    principal: Principal | None
    claim: Claim | None = None

    @property
    def name(self) -> str | None:
        return self.principal.name if self.principal else None

    def require(self, *roles: Role) -> Principal:
        """The principal, if it holds one of ``roles``; Forbidden otherwise."""
        if self.principal is None or self.principal.role not in roles:
            raise Forbidden("this operation needs the role " + " or ".join(r.value for r in roles))
        return self.principal


def format_time(when: datetime) -> str:
    """``when`` (UTC) as "YYYY-MM-DDTHH:MM:SS.mmmZ", the milliseconds truncated: the
    time field of audit records, ordered as text. Years 1000 to 9999."""
    return when.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


class EventBuilder:
    """Collects the fields of one audit record while its operation runs."""

    def __init__(self, caller: Caller, name: str) -> None:
        self._fields: dict[str, Any] = {
            "request_id": caller.request_id,
            "principal": caller.name,
            "operation": name,
        }
        self._describe: Callable[[str | None], str] | None = None
        self.written = False  # the request's records are committed (set by the writer)
        self.failure: tuple[list[EventBuilder], int] | None = None  # see fail_as()

    @property
    def event(self) -> AuditEvent:
        return AuditEvent(**self._fields)

    def note(self, **fields: Any) -> None:
        self._fields.update(fields)

    def describe_failures(self, describe: Callable[[str | None], str]) -> None:
        """Write a failure's detail as ``describe(reason)`` (the XKS face's metadata)."""
        self._describe = describe

    def ok(self, **fields: Any) -> AuditEvent:
        return AuditEvent(**{**self._fields, **fields, "outcome": "ok"})

    def failed(self, code: str, detail: str | None) -> AuditEvent:
        if self._describe is not None:
            detail = self._describe(detail)
        return AuditEvent(**{**self._fields, "outcome": code, "detail": detail})

    def fail_as(self, ops: list[EventBuilder], unreached: int) -> None:
        """If the operation fails, record the events of ``ops`` and ``unreached`` more
        (the items of a batch it never reached) instead of this one event."""
        self.failure = (ops, unreached)


class _Scope:
    """The audit of one request: its innermost operation so far."""

    def __init__(self, op: EventBuilder) -> None:
        self.op = op


# The request being served in this context (a thread, a gunicorn sync worker's request).
_scope: ContextVar[_Scope | None] = ContextVar("kms_audit_scope", default=None)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Sign a checkpoint once this many records are unsigned (0: never by count)."""

    every_records: int = 1000


class AuditTrail:
    def __init__(
        self,
        storage: Store[AuditRows],
        clock: Clock,
        hsm: Hsm,
        policy: CheckpointPolicy = CheckpointPolicy(),
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._hsm = hsm
        self._policy = policy
        self._fingerprint: str | None = None

    @staticmethod
    def drafts(events: Sequence[AuditEvent]) -> list[audit_record.Draft]:
        """The records of ``events``, encoded ahead of append() (outside the transaction,
        so the writer lock is held only to chain them)."""
        drafts = []
        for ev in events:
            fields: dict[str, Any] = {"v": audit_record.FORMAT_VERSION, **vars(ev)}
            if fields["detail"] is not None:
                fields["detail"] = fields["detail"][:MAX_DETAIL]
            drafts.append(audit_record.Draft(fields))
        return drafts

    def append(self, tx: AuditRows, events: Sequence[AuditEvent]) -> bool:
        """Chain ``events`` after the current head inside ``tx``. Returns whether the count
        policy now wants a checkpoint (sign it with checkpoint_quietly() once ``tx``
        committed)."""
        return self.append_drafts(tx, self.drafts(events))

    @AUDIT_APPEND_SECONDS.time()
    def append_drafts(self, tx: AuditRows, drafts: Sequence[audit_record.Draft]) -> bool:
        """append() for records already encoded with drafts()."""
        head = tx.audit_head()
        seq, prev = head.seq, head.hash
        now = format_time(self._clock.now())
        rows = []
        for draft in drafts:
            seq += 1
            row = draft.seal(seq, now, prev)
            prev = row["hash"]
            rows.append(row)
        tx.insert_audit(rows)
        every = self._policy.every_records
        return bool(every) and seq - head.checkpoint_seq >= every

    def record(self, events: Sequence[AuditEvent]) -> None:
        """Append ``events`` in a transaction of their own (raises StorageUnavailable);
        then sign a checkpoint if the policy says one is due (a failure to sign is logged,
        never raised: the records are already durable)."""
        with self._storage.transaction() as tx:
            due = self.append(tx, events)
        if due:
            self.checkpoint_quietly()

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint(self, caller: Caller | None = None) -> dict[str, Any] | None:
        """Sign the chain head unless the newest checkpoint already covers it; return the
        newest checkpoint (None if the chain is empty). With a ``caller`` (an admin asking
        explicitly) the request is recorded first, so the checkpoint covers it too."""
        if caller is not None:
            with self.operation(caller, "create_checkpoint") as op:
                caller.require(Role.ADMIN)
                return self._sign_head([op.ok()])
        return self._sign_head([])

    def checkpoint_quietly(self) -> None:
        """checkpoint(), logging instead of raising (timers, shutdown, count policy)."""
        try:
            self.checkpoint()
        except KmsError as e:
            log.warning("audit checkpoint failed", extra={"code": e.code, "detail": e.detail})

    def _sign_head(self, events: Sequence[AuditEvent]) -> dict[str, Any] | None:
        """Sign outside any write transaction (the HSM never runs under the database's
        write lock), then store the checkpoint unless another one got there first."""
        fingerprint = self.public_key_fingerprint()
        if events:
            with self._storage.transaction() as tx:
                self.append(tx, events)
        with self._storage.reader() as tx:
            head = tx.audit_head()
            if head.seq == 0:
                return None
            if head.seq == head.checkpoint_seq:
                return tx.checkpoints(head.seq - 1, head.seq, 1)[0]
        cp: dict[str, Any] = {
            "v": cpfmt.FORMAT_VERSION,
            "seq": head.seq,
            "prev_seq": head.checkpoint_seq,
            "record_hash": head.hash,
            "time": format_time(self._clock.now()),
            "key_sha256": fingerprint,
        }
        signature = self._hsm.sign_digest(cpfmt.digest(cp))
        cp["signature"] = base64.b64encode(signature).decode("ascii")
        with self._storage.transaction() as tx:
            current = tx.audit_head()
            if current.checkpoint_seq != head.checkpoint_seq:
                # another worker signed meanwhile; its checkpoint is as good
                return tx.checkpoints(current.checkpoint_seq - 1, current.checkpoint_seq, 1)[0]
            tx.insert_checkpoint(cp)
        return cp

    def public_key_pem(self) -> bytes:
        """The audit public key (PEM) auditors verify checkpoints with."""
        return self._hsm.audit_public_key_pem()

    def read_public_key(self, caller: Caller) -> bytes:
        with self.operation(caller, "read_audit_public_key"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            return self.public_key_pem()

    def public_key_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = cpfmt.key_fingerprint(self.public_key_pem())
        return self._fingerprint

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
        if isinstance(error, KmsError):
            code, detail = error.code, error.detail or error.message
        else:
            code, detail = "internal_error", type(error).__name__
        ops, unreached = op.failure or ([op], 0)
        failed = [o.failed(code, detail) for o in ops]
        failed += [replace(op.event, outcome=code, detail="batch aborted")] * unreached
        try:
            self.record(failed)
        except StorageUnavailable:
            log.error("could not record a refused operation", extra={"op": failed[0].operation})

    def records(
        self, caller: Caller, after: int, limit: int, query: AuditQuery | None = None
    ) -> list[dict[str, Any]]:
        """One page of records in chain order matching ``query``, for admins and auditors."""
        with self.operation(caller, "read_audit"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            _check_page(after, limit)
            with self._storage.reader() as tx:
                return tx.audit_records(after, limit, query=query)

    def checkpoints(self, caller: Caller, after: int, limit: int) -> list[dict[str, Any]]:
        """Signed checkpoints with seq > ``after``, oldest first."""
        with self.operation(caller, "read_checkpoints"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            _check_page(after, limit)
            with self._storage.reader() as tx:
                return tx.checkpoints(after, None, limit)


def _check_page(after: int, limit: int) -> None:
    if after < 0 or not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"after must be >= 0 and limit 1..{MAX_PAGE}")
