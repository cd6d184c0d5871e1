"""The audit trail: hash-chained records appended in the caller's transaction, and
checkpoints of the chain head signed by the HSM's audit key.

Guarantees: a record is appended in the same transaction as the state change it
describes, or alone for operations that change nothing; if it cannot be written the
operation is refused (the exception propagates, the transaction rolls back, and the API
answers 503). Records never hold plaintext, key material, tokens or PINs: only names,
ids, versions, a hash of the encryption context and an error code or reason. Appends are
serialised by the database (the head row is locked), so the chain is one linear sequence
whatever the number of workers or nodes. The records after the newest signed checkpoint
are bounded: past CheckpointPolicy.max_unsigned, audited operations are refused until a
checkpoint is signed again (kms/services/audit_tail.py says what happens to them).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from kms.errors import (
    AuditStateRefused,
    Conflict,
    Forbidden,
    InvalidRequest,
    KmsError,
    UnsignedTailFull,
)
from kms.formats import audit_record
from kms.formats import checkpoint as cpfmt
from kms.formats.anchor import Anchor
from kms.metrics import AUDIT_APPEND_SECONDS, AUDIT_STATE_REFUSED
from kms.services.audit_anchor import AnchorCheck, AuditAnchor
from kms.services.audit_events import Caller, format_time, local_event
from kms.services.audit_scope import Operations, in_operation
from kms.services.audit_tail import (
    DEFAULT_MAX_UNSIGNED,
    DEFAULT_MAX_UNSIGNED_SECONDS,
    UnsignedTail,
)
from kms.services.hsm_port import Hsm
from kms.services.model import AuditEvent, AuditQuery, Role
from kms.services.ports import AuditRows, Clock, NotificationRows, PrincipalRows, Store
from kms.services.state_index import StateIndex

log = logging.getLogger("kms.audit")
MAX_PAGE = 1000
MAX_DETAIL = 256
RECHECK_SECONDS = 2.0  # how often a refusing worker asks the HSM anchor again


class AppendTx(AuditRows, PrincipalRows, Protocol):
    """What append() reads and writes: the chain, and its callers' principal rows."""


@dataclass(frozen=True)
class CheckpointPolicy:
    """Sign a checkpoint once ``every_records`` records are unsigned (0: never by count,
    but always at half ``max_unsigned``); refuse audited operations rather than let more
    than ``max_unsigned`` records go unsigned (kms/services/audit_tail.py)."""

    every_records: int = 1000
    max_unsigned: int = DEFAULT_MAX_UNSIGNED
    max_unsigned_seconds: float = DEFAULT_MAX_UNSIGNED_SECONDS


class AuditTx(AuditRows, NotificationRows, Protocol):
    """The rows the trail writes: the chain, and the outbox that announces checkpoints."""


class AuditTrail(Operations):
    def __init__(
        self,
        storage: Store[AuditTx],
        clock: Clock,
        hsm: Hsm,
        policy: CheckpointPolicy = CheckpointPolicy(),
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._hsm = hsm
        self._policy = policy
        self._tail = UnsignedTail(
            policy.max_unsigned, policy.max_unsigned_seconds, lambda: clock.now().timestamp()
        )
        self._fingerprint: str | None = None
        # queues each new checkpoint for the data owner (witness) in the transaction that
        # stores it: Notifier.checkpoint_signed, set by build_services (the notifier
        # audits through this trail, so it is made after it)
        self.on_checkpoint: Callable[[NotificationRows, dict[str, Any]], None] | None = None
        # the sealed rows' state, checked and carried by checkpoints (kms/app.py sets it)
        self.sealed_state: StateIndex | None = None
        self._anchor = AuditAnchor(hsm)
        self._anchored = False  # this process saw the database extend the HSM anchor
        self._refusal: tuple[float, str] | None = None  # when and why it last did not
        self._known_chain_id: str | None = None

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

    def append(self, tx: AppendTx, events: Sequence[AuditEvent]) -> bool:
        """Chain ``events`` after the current head inside ``tx``, once their principals
        are read again there and found enabled (a principal disabled while its request
        was in flight changes nothing: Forbidden, and ``tx`` rolls back; the key-use
        pipeline does the same in KeyWork.commit). Returns whether the count policy now
        wants a checkpoint (sign it with checkpoint_quietly() once ``tx`` committed)."""
        for name in {e.principal for e in events if e.principal and e.outcome == "ok"}:
            if ":" in name:  # the server's own (system:scheduler), never a row
                continue
            current = tx.principal_by_name(name)
            if current is None or current.disabled:
                raise Forbidden(
                    "this principal is disabled", detail=f"principal {name} is disabled or gone"
                )
        return self.append_drafts(tx, self.drafts(events))

    @AUDIT_APPEND_SECONDS.time()
    def append_drafts(self, tx: AuditRows, drafts: Sequence[audit_record.Draft]) -> bool:
        """append() for records already encoded with drafts(): every record of an
        operation passes here. Raises AuditStateRefused (nothing is appended) until this
        process has seen the database's chain extend its HSM anchor: once per process,
        then again at every checkpoint; and UnsignedTailFull (503 hsm_unavailable,
        nothing appended) if the records would take the unsigned tail past its bound."""
        if not self._anchored:
            self._check_anchor(tx)
        return self._chain(tx, drafts, bounded=True)

    def _chain(
        self, tx: AuditRows, drafts: Sequence[audit_record.Draft], bounded: bool = False
    ) -> bool:
        head = tx.audit_head()
        if bounded:  # operator repairs (anchor, accept-state) are not
            self._tail.admit(head, len(drafts))
        seq, prev = head.seq, head.hash
        now = format_time(self._clock.now())
        rows = []
        for draft in drafts:
            seq += 1
            row = draft.seal(seq, now, prev)
            prev = row["hash"]
            rows.append(row)
        tx.insert_audit(rows)
        self._tail.appended(seq - head.checkpoint_seq)
        return self._tail.wants_signature(seq - head.checkpoint_seq, self._policy.every_records)

    def record(self, events: Sequence[AuditEvent]) -> None:
        """Append ``events`` in a transaction of their own (raises StorageUnavailable);
        then sign a checkpoint if the policy says one is due (a failure to sign is logged,
        never raised: the records are already durable). These records change nothing
        else (refusals, reads, alarms), so their principals are not read again."""
        if not in_operation():  # (an operation tried at its start)
            self._sign_if_full()
        with self._storage.transaction() as tx:
            due = self.append_drafts(tx, self.drafts(events))
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
        """checkpoint(), never raising (timers, shutdown, count policy): a failure is the
        alarm of audit_tail.UnsignedTail.sign_failed (a metric and an ERROR line)."""
        with contextlib.suppress(KmsError):  # counted and logged by _sign_head
            self.checkpoint()

    def _sign_if_full(self) -> None:
        """Before an operation: if this process saw the unsigned tail at its bound, try
        once to sign (the HSM may be back), so the operation need not be refused."""
        if not self._tail.full():
            return
        with self._tail.recovery():
            if self._tail.full():
                self.checkpoint_quietly()

    def _sign_head(self, events: Sequence[AuditEvent]) -> dict[str, Any] | None:
        """Sign outside any write transaction (the HSM never runs under the database's
        write lock), then store the checkpoint unless another one got there first. With a
        ``sealed_state`` the checkpoint is format 2 and carries the verified state of the
        sealed rows (kms/formats/checkpoint.py); StateRefused if it does not verify. Any
        failure is the alarm of UnsignedTail.sign_failed before it is raised."""
        try:
            cp, unsigned = self._sign_and_store(events)
        except UnsignedTailFull:
            raise  # the request's own record found the tail full: no signature was tried
        except KmsError as e:
            self._tail.sign_failed(e)
            raise
        if unsigned is not None:
            self._tail.signed(unsigned)
        return cp

    def _sign_and_store(
        self, events: Sequence[AuditEvent]
    ) -> tuple[dict[str, Any] | None, int | None]:
        """_sign_head()'s work: the newest checkpoint and the records unsigned after it
        (None when the chain is empty)."""
        fingerprint = self.public_key_fingerprint()
        if events:
            with self._storage.transaction() as tx:
                self.append_drafts(tx, self.drafts(events))
        chain_id = self._chain_id()
        with self._storage.reader() as tx:
            checked = self._check_anchor(tx, chain_id, rehash=False)
            head = checked.head
            if head.seq == 0:
                return None, None
            signed = tx.checkpoints(head.seq - 1, head.seq, 1)  # the row, not checkpoint_seq
            if signed:
                return signed[0], 0
            prev = head.checkpoint_seq  # the previous checkpoint, if its row says so too
            if not (prev < head.seq and (prev == 0 or tx.checkpoints(prev - 1, prev, 1))):
                prev = checked.anchor.seq if checked.anchor.seq < head.seq else 0
        # the sealed rows now, checked against the HSM state anchor: StateRefused (and no
        # checkpoint) if one was rolled back, inserted or deleted in the database
        state = None if self.sealed_state is None else self.sealed_state.checkpoint_state()
        now = format_time(self._clock.now())
        cp = cpfmt.unsigned(head.seq, prev, head.hash, now, fingerprint, state)
        signature = self._hsm.sign_digest(cpfmt.digest(cp))
        cp["signature"] = base64.b64encode(signature).decode("ascii")
        self._anchor.advance(checked.chain_id, Anchor(head.seq, head.hash, checked.anchor.archived))
        with self._storage.transaction() as tx:
            current = tx.audit_head()
            newer = tx.checkpoints(head.checkpoint_seq, current.checkpoint_seq, 1)
            if current.checkpoint_seq != head.checkpoint_seq and newer:
                # another worker signed meanwhile; its checkpoint is as good
                return newer[0], current.seq - current.checkpoint_seq
            tx.insert_checkpoint(cp)
            if self.on_checkpoint is not None:
                self.on_checkpoint(tx, cp)  # witnessed, or not stored at all
        return cp, current.seq - head.seq

    # -- the HSM anchor (kms/services/audit_anchor.py) -----------------------------------

    def _chain_id(self) -> str | None:
        """The database's chain id, remembered once known (only ``kms init`` and
        accept-state set it, and a worker keeps checking against the anchor it named)."""
        if self._known_chain_id is None:
            with self._storage.reader() as tx:
                self._known_chain_id = tx.audit_chain_id()
        return self._known_chain_id

    def _check_anchor(
        self, tx: AuditRows, chain_id: str | None = None, rehash: bool = True
    ) -> AnchorCheck:
        """Verify in ``tx`` that the chain extends the HSM anchor, or refuse: loudly the
        first time, then from memory for RECHECK_SECONDS before asking the HSM again.
        Readers pass ``chain_id`` (AuditAnchor.verify says why); ``rehash`` as for
        audit_anchor.check_extends (a process's first check re-hashes)."""
        if self._refusal is not None and time.monotonic() - self._refusal[0] < RECHECK_SECONDS:
            raise AuditStateRefused(detail=self._refusal[1])
        try:
            checked = self._anchor.verify(tx, chain_id, rehash)
        except AuditStateRefused as e:
            self._anchored = False
            if self._refusal is None or self._refusal[1] != e.detail:
                AUDIT_STATE_REFUSED.inc()
                log.error(
                    "audit chain refused: it does not extend its HSM anchor; nothing audited "
                    "runs until an operator runs `kms audit accept-state`",
                    extra={"detail": e.detail},
                )
            self._refusal = (time.monotonic(), e.detail or "")
            raise
        self._anchored, self._refusal = True, None
        return checked

    def verify_anchor(self) -> None:
        """Return only if the database's chain extends its HSM anchor now (readiness);
        AuditStateRefused with the reason otherwise, HsmUnavailable if it cannot tell."""
        chain_id = self._chain_id()
        with self._storage.reader() as tx:
            self._check_anchor(tx, chain_id, rehash=False)

    def anchor_new_chain(self, allow_other_chains: bool = False) -> str | None:
        """``kms init``: give a database without a chain id one and anchor its head in the
        HSM (a chain that already has records first records that it is being anchored:
        what came before was trusted as found); None if the database is anchored already.
        Conflict if the token anchors other chains (this database may be replacing one of
        them: that is accept_state's business) unless ``allow_other_chains``."""
        with self._storage.transaction() as tx:
            if tx.audit_chain_id() is not None:
                return None
            others = self._anchor.other_chains(None)
            if others and not allow_other_chains:
                raise Conflict(
                    f"this HSM already anchors {len(others)} other audit chain(s); if this "
                    "database replaces one, run `kms audit accept-state`"
                )
            if tx.audit_head().seq:  # an existing chain: say when it was first anchored
                self._chain(tx, self.drafts([local_event("anchor_audit_chain", None)]))
            # the one HSM call under the write lock: the database must name the anchor
            # only if the anchor exists, so the id commits after the object is created
            return self._anchor.anchor_new_chain(tx)

    def accept_state(self, reason: str) -> tuple[str | None, str]:
        """``kms audit accept-state``: record that an operator accepted the database's
        chain as it is (with ``reason``), then make its head the HSM anchor. Returns the
        problem that was accepted (None if there was none) and the chain id."""
        with self._storage.reader() as tx:
            try:
                self._anchor.verify(tx)
                problem = None
            except AuditStateRefused as e:
                problem = e.detail
        if self.sealed_state is not None and problem is None:
            try:
                self.sealed_state.verified_state()
            except AuditStateRefused as e:  # StateRefused: the sealed rows' anchor
                problem = e.detail
        with self._storage.transaction() as tx:
            chain_id = tx.audit_chain_id() or secrets.token_hex(16)
            detail = f"accepted chain {chain_id}: {problem or 'no mismatch'}; reason: {reason}"
            self._chain(tx, self.drafts([local_event("accept_audit_state", detail)]))
            tx.set_audit_chain_id(chain_id)
            head = tx.audit_head()
            # under the write lock so no other process moves the anchor meanwhile
            self._anchor.replace(chain_id, Anchor(head.seq, head.hash, head.archived_seq))
        if self.sealed_state is not None:  # and the sealed rows as they are now
            self.sealed_state.anchor(chain_id)
        self._anchored, self._refusal = False, None
        log.warning("audit state accepted by an operator", extra={"detail": detail})
        return problem, chain_id

    def anchor_archived(self, tx: AuditRows, through: int) -> None:
        """``kms audit archive``, inside the transaction that archives records up to
        ``through``: the HSM anchor records it, so only this command moves what the
        database may call archived."""
        chain_id = tx.audit_chain_id()
        if chain_id is None:
            raise AuditStateRefused(detail="this database's audit chain is not anchored")
        current = self._anchor.read(chain_id)
        self._anchor.replace(chain_id, replace(current, archived=through))

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

    def records(
        self, caller: Caller, after: int, limit: int, query: AuditQuery | None = None
    ) -> list[dict[str, Any]]:
        """One page of records in chain order matching ``query``, for admins and auditors."""
        with self.operation(caller, "read_audit"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            check_page(after, limit)
            with self._storage.reader() as tx:
                return tx.audit_records(after, limit, query=query)

    def checkpoints(self, caller: Caller, after: int, limit: int) -> list[dict[str, Any]]:
        """Signed checkpoints with seq > ``after``, oldest first."""
        with self.operation(caller, "read_checkpoints"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            check_page(after, limit)
            with self._storage.reader() as tx:
                return tx.checkpoints(after, None, limit)


def check_page(after: int, limit: int) -> None:
    """InvalidRequest unless ``after`` >= 0 and 1 <= ``limit`` <= MAX_PAGE."""
    if after < 0 or not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"after must be >= 0 and limit 1..{MAX_PAGE}")
