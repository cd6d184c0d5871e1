"""Escrow cases: access outside normal grants, only with an M-of-N custodian quorum.

A requester files a case (legal basis, justification, scope, unwrap budget, expiry).
Custodians approve or reject it offline with their own Ed25519 keys, signing the case
digest (kms/formats/escrow.py), so the server's database alone cannot forge a decision.
When the quorum of the case's policy is reached, a waiting period lets the data owner
(notified by webhook) contest through a veto custodian; then the case is active and its
requester may unwrap blobs within its scope, at most ``max_unwraps`` times, until it
expires, is revoked or closed. Every transition, decision and unwrap is audited with the
case id.

States::

    pending --quorum--> approved --waiting period--> active --> closed
       |                   |                           |
       +--veto rejection---+--------> rejected <-------+
    any open state --revoke--> revoked;  any open state --expiry--> expired
    an amendment (new version) puts an open case back to pending; older approvals lapse.

Transitions that depend on time (active, expired) are applied when the case is next
read or used, in a write transaction, and audited then.

What a case holds and how it is built from a request is in kms/services/escrow_filing.py;
how decisions are counted into a quorum, in kms/services/escrow_quorum.py.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from kms.errors import Conflict, Forbidden, NotFound
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller, EventBuilder, format_time
from kms.services.escrow_common import (
    EscrowRows,
    EscrowSettings,
    EscrowTx,
    require_configured,
    signer,
)
from kms.services.escrow_filing import CaseRequest, build_case
from kms.services.escrow_quorum import Quorum
from kms.services.key_use import CaseStanding
from kms.services.model import (
    OPEN_CASE_STATES,
    CaseState,
    Decision,
    EscrowCase,
    EscrowPolicy,
    Notification,
    Role,
)
from kms.services.notify import Notifier
from kms.services.ports import Clock, Store

log = logging.getLogger("kms.escrow")


@dataclass(frozen=True)
class CaseView:
    case: EscrowCase
    policy: EscrowPolicy
    approvals: list[str]  # custodians whose approval counts now
    rejections: list[str]
    notifications: list[dict[str, Any]]


class EscrowService:
    def __init__(
        self,
        storage: Store[EscrowTx],
        audit: AuditTrail,
        clock: Clock,
        notifier: Notifier,
        settings: EscrowSettings,
        rows: EscrowRows,
    ) -> None:
        self._storage = storage
        self._rows = rows
        self._audit = audit
        self._clock = clock
        self._notifier = notifier
        self._settings = settings
        self._quorum = Quorum(rows, settings, clock)

    # -- the case procedure -----------------------------------------------------------------

    def file(self, caller: Caller, request: CaseRequest) -> EscrowCase:
        with self._audit.operation(caller, "file_case") as op:
            requester = caller.require(Role.REQUESTER)
            require_configured(self._notifier, self._settings)
            case_id = str(uuid.uuid4())
            op.note(case_id=case_id, justification=request.justification)
            with self._storage.transaction() as tx:
                case = self._build(tx, case_id, 1, requester.name, request)
                self._rows.put_case(tx, case, new=True)
                self._notifier.enqueue(tx, case, "case_filed")
                self._audit.append(tx, [op.ok(detail=f"digest={case.digest[:16]}")])
            return case

    def amend(self, caller: Caller, case_id: str, request: CaseRequest) -> EscrowCase:
        """A new version of an open case: back to pending, earlier approvals lapse."""
        with self._audit.operation(caller, "amend_case") as op:
            caller.require(Role.REQUESTER)
            require_configured(self._notifier, self._settings)
            op.note(case_id=case_id, justification=request.justification)
            with self._storage.transaction() as tx:
                case = self._settle(tx, self._visible(tx, caller, case_id))
                if case.state not in OPEN_CASE_STATES:
                    raise Conflict(f"the case is {case.state.value}")
                new = replace(
                    self._build(tx, case_id, case.version + 1, case.requester, request),
                    created_at=case.created_at,
                    unwraps_used=case.unwraps_used,
                )
                self._rows.put_case(tx, new)
                self._notifier.enqueue(tx, new, "case_amended")
                self._audit.append(tx, [op.ok(detail=f"version={new.version}")])
            return new

    def view(self, caller: Caller, case_id: str) -> CaseView:
        """The case as it stands now (time-driven transitions applied), with who approved."""
        with self._audit.operation(caller, "read_case") as op:
            caller.require(Role.ADMIN, Role.AUDITOR, Role.CUSTODIAN, Role.REQUESTER)
            op.note(case_id=case_id)
            with self._storage.transaction() as tx:
                case = self._settle(tx, self._visible(tx, caller, case_id))
                policy = self._quorum.policy(tx, case)
                approvers, rejecters = self._quorum.tally(tx, case, fresh_only=True)
                notes = [
                    {
                        "event": n.event,
                        "state": n.state,
                        "attempts": n.attempts,
                        "last_error": n.last_error,
                    }
                    for n in tx.notifications(case_id)
                ]
            return CaseView(case, policy, sorted(approvers), sorted(rejecters), notes)

    def decide(
        self, caller: Caller, case_id: str, custodian_name: str, signature: bytes, decision: str
    ) -> EscrowCase:
        """Record a custodian's signed approval or rejection, then re-evaluate the case."""
        name = "approve_case" if decision == "approve" else "reject_case"
        with self._audit.operation(caller, name) as op:
            caller.require(Role.CUSTODIAN)
            op.note(case_id=case_id, detail=f"custodian={custodian_name}")
            if caller.name != custodian_name:
                raise Forbidden("a custodian submits only their own decisions")
            with self._storage.transaction() as tx:
                case = self._rows.case(tx, case_id)
                if case is None:
                    raise NotFound("no such case")
                case = self._settle(tx, case)
                if case.state not in OPEN_CASE_STATES:
                    raise Conflict(f"the case is {case.state.value}")
                custodian = signer(
                    self._rows.custodians(tx),
                    custodian_name,
                    case.requester,
                    bytes.fromhex(case.digest),
                    signature,
                    decision,
                    "this version of the case",
                )
                tx.add_decision(
                    case_id,
                    Decision(custodian.name, decision, case.version, signature, self._now()),
                )
                self._audit.append(
                    tx, [op.ok(detail=f"custodian={custodian.name} v{case.version}")]
                )
                case = self._evaluate(tx, case, caller)
            return case

    def revoke(self, caller: Caller, case_id: str) -> EscrowCase:
        """Stop a case at once (admin, or its requester)."""
        return self._end(
            caller, case_id, "revoke_case", CaseState.REVOKED, (Role.ADMIN, Role.REQUESTER)
        )

    def close(self, caller: Caller, case_id: str) -> EscrowCase:
        """The requester is done with the case."""
        return self._end(caller, case_id, "close_case", CaseState.CLOSED, (Role.REQUESTER,))

    # -- unwrapping under a case ----------------------------------------------------------------

    def standing(self, tx: EscrowTx, case_id: str, *, settle: bool = False) -> CaseStanding:
        """The case as an unwrap decision needs it (kms/services/key_use.py). Reads only,
        unless ``settle`` (inside the audit write transaction): then time-driven
        transitions (active, expired) are applied and audited first."""
        case = self._rows.case(tx, case_id)
        if case is None:
            return CaseStanding(None, CaseState.CLOSED, False, "unknown case")
        if settle:
            case = self._settle(tx, case)
        state = self._time_state(case, self._now())
        reason = self._quorum.approvals_lost(tx, case)
        return CaseStanding(case, state, reason is None, reason or "")

    def spend(self, tx: EscrowTx, case_id: str, count: int) -> None:
        """Inside the audit write transaction, after the decision on fresh rows allowed
        them: spend ``count`` unwraps of the case's budget."""
        case = self._rows.case(tx, case_id)
        assert case is not None
        self._rows.put_case(tx, replace(case, unwraps_used=case.unwraps_used + count))

    # -- internals ----------------------------------------------------------------------------

    def _now(self) -> str:
        return format_time(self._clock.now())

    def _build(
        self, tx: EscrowTx, case_id: str, version: int, requester: str, r: CaseRequest
    ) -> EscrowCase:
        """A new pending version of the case, made now (kms/services/escrow_filing.py)."""
        return build_case(
            tx,
            case_id,
            version,
            requester,
            r,
            now=self._clock.now(),
            max_case_seconds=self._settings.max_case_seconds,
        )

    def _visible(self, tx: EscrowTx, caller: Caller, case_id: str) -> EscrowCase:
        """The case, locked; a requester sees only their own (others get NotFound)."""
        case = self._rows.case(tx, case_id)
        if case is None or (
            caller.principal is not None
            and caller.principal.role is Role.REQUESTER
            and case.requester != caller.name
        ):
            raise NotFound("no such case")
        return case

    def _evaluate(self, tx: EscrowTx, case: EscrowCase, caller: Caller) -> EscrowCase:
        quorum, vetoed, approvers = self._quorum.verdict(tx, case, fresh_only=True)
        if vetoed:
            return self._transition(tx, case, CaseState.REJECTED, caller, "veto")
        if case.state is CaseState.PENDING and quorum:
            # The waiting period starts once the data owner has been told (see delivered()).
            case = self._transition(
                tx, case, CaseState.APPROVED, caller, f"by {','.join(sorted(approvers))}"
            )
            self._notifier.enqueue(tx, case, "case_approved")
        return case

    def delivered(self, tx: EscrowTx, notification: Notification) -> None:
        """The data owner received a notification: an approval starts the waiting period."""
        if notification.event != "case_approved":
            return
        case = self._rows.case(tx, notification.case_id)
        version = json.loads(notification.payload).get("version")
        if case is None or case.state is not CaseState.APPROVED or case.version != version:
            return
        if case.active_from is None:
            waiting = timedelta(seconds=self._settings.waiting_period_seconds)
            self._rows.put_case(
                tx, replace(case, active_from=format_time(self._clock.now() + waiting))
            )

    def _time_state(self, case: EscrowCase, now: str) -> CaseState:
        if case.state in OPEN_CASE_STATES and now >= case.expires_at:
            return CaseState.EXPIRED
        if case.state is CaseState.APPROVED and case.active_from and now >= case.active_from:
            return CaseState.ACTIVE
        return case.state

    def _settle(self, tx: EscrowTx, case: EscrowCase) -> EscrowCase:
        """Apply time-driven transitions (active, expired) and audit them."""
        state = self._time_state(case, self._now())
        if state is case.state:
            return case
        return self._transition(tx, case, state, Caller("escrow-clock", None), "time")

    def _transition(
        self, tx: EscrowTx, case: EscrowCase, state: CaseState, caller: Caller, why: str
    ) -> EscrowCase:
        new = replace(case, state=state)
        self._rows.put_case(tx, new)
        event = EventBuilder(caller, f"case_{state.value}").ok(
            case_id=case.case_id, detail=f"{case.state.value}->{state.value} ({why})"
        )
        self._audit.append(tx, [event])
        return new

    def _end(
        self, caller: Caller, case_id: str, name: str, state: CaseState, roles: tuple[Role, ...]
    ) -> EscrowCase:
        with self._audit.operation(caller, name) as op:
            caller.require(*roles)
            op.note(case_id=case_id)
            with self._storage.transaction() as tx:
                case = self._settle(tx, self._visible(tx, caller, case_id))
                if case.state not in OPEN_CASE_STATES:
                    raise Conflict(f"the case is {case.state.value}")
                new = replace(case, state=state)
                self._rows.put_case(tx, new)
                self._audit.append(tx, [op.ok(detail=f"{case.state.value}->{state.value}")])
            return new
