"""Dual control of the control plane: a change that can lead to plaintext or weaken
oversight takes effect only once custodians other than its proposer approved it.

Each gated service method (creating a principal that can receive plaintext, a grant that
returns or unwraps key material, SigV4 credentials or a token for someone else,
registering or revoking a custodian, an escrow or XKS policy, scheduling a key's
deletion, the control policy itself) calls ``require`` before its transaction and
``consume`` inside it:

- Under ``dual`` (the default), a call that carries no approved change is recorded as a
  pending change instead (``ChangeProposed``: the API answers 202) and the data owner is
  notified. Custodians approve or reject it offline with their escrow keys, signing its
  digest (kms/formats/change.py). Its proposer then applies it: the same call again,
  carrying the change id; ``consume`` checks, inside the effect's own transaction, that
  the call is the change that was approved (kind and arguments equal, same proposer),
  that it has not expired, was not rejected or applied, and that its signed approvals
  still make the quorum under the policy now; then marks it applied. So the proposer's
  token alone never completes a change, and two nodes applying at once apply it once
  (the change row is locked and sealed).
- Under ``single-operator`` changes apply at once; the mode is explicit (config, pinned
  in the sealed state at first start), shown on the dashboard and /readyz, and logged by
  every worker at start.

Nothing stored is taken on trust: the policy and every change carry an HSM seal checked
for freshness against the state anchor (kms/services/state_index.py); a change's digest
is recomputed from its fields; decisions are signatures checked against custodian keys
whose rows carry their seals (kms/services/escrow_common.py). Whoever writes the database
can neither approve, widen, revive nor re-apply a change, nor switch the mode.

Which approvals a change needs is in kms/services/change_quorum.py.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from kms.errors import (
    ChangeProposed,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    SealBroken,
)
from kms.formats import change as changefmt
from kms.formats.state import ident
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller, EventBuilder, format_time
from kms.services.change_model import (
    APPLIED,
    CANCELLED,
    GROUP_RE,
    MODES,
    PENDING,
    REJECTED,
    STATES,
    Change,
    ChangeDecision,
    ControlPolicy,
)
from kms.services.change_quorum import ChangeQuorum, ChangeTx
from kms.services.escrow_common import EscrowRows, EscrowSettings, signer
from kms.services.key_refs import resolve
from kms.services.model import Role
from kms.services.notify import Notifier
from kms.services.ports import Clock, Store

log = logging.getLogger("kms.changes")
MAX_LISTED = 200
EXPIRED = "expired"  # shown, never stored: a pending change past its expiry
TTL_RANGE = (300, 30 * 86400)


@dataclass(frozen=True)
class ChangeView:
    change: Change
    state: str  # the stored state, or "expired"
    required_groups: list[str]
    approvals: list[str]  # custodians whose approval counts now
    rejections: list[str]
    approved: bool  # the quorum holds: the proposer may apply it
    vetoed: bool  # a member of a needed group rejected it


class ChangeService:
    def __init__(
        self,
        storage: Store[ChangeTx],
        audit: AuditTrail,
        clock: Clock,
        notifier: Notifier,
        rows: EscrowRows,
        initial: ControlPolicy,
        escrow: EscrowSettings,
    ) -> None:
        self._storage = storage
        self._audit = audit
        self._clock = clock
        self._notifier = notifier
        self._rows = rows
        self._initial = initial
        self._quorum = ChangeQuorum(rows, escrow)

    # -- the policy ---------------------------------------------------------------------

    def policy(self) -> ControlPolicy:
        """The policy in force (the configured one while none is pinned yet)."""
        with self._storage.reader() as tx:
            return self.in_force(tx)

    def in_force(self, tx: ChangeTx) -> ControlPolicy:
        """The policy in force, read in ``tx`` (the configured one while none is pinned)."""
        return self._sealed_policy(tx) or self._initial

    def pin(self) -> ControlPolicy:
        """Pin the configured policy in the sealed state unless one is (at start, by
        ``kms init`` and every worker); logs the mode. Returns the policy in force."""
        with self._storage.transaction() as tx:
            policy = self._policy(tx)
        if policy.dual:
            log.info("dual control: %s", policy.summary())
        else:
            log.warning(
                "SINGLE-OPERATOR MODE: control-plane changes take effect without approvals "
                "(development only)"
            )
        return policy

    def set_policy(self, caller: Caller, policy: ControlPolicy) -> ControlPolicy:
        """Replace the control policy (admin; a change under dual control)."""
        with self._audit.operation(caller, "set_control_policy") as op:
            caller.require(Role.ADMIN)
            check_policy(policy)
            params = policy.fields()
            del params["id"]
            op.note(detail=policy.summary())
            self.require(caller, "set_control_policy", params)
            with self._storage.transaction() as tx:
                old = self._policy(tx)
                self.consume(tx, caller, "set_control_policy", params)
                out_of_reach = policy.dual and self._quorum.out_of_reach(tx, params)
                if out_of_reach:  # (single-operator mode proposes nothing: checked here)
                    raise InvalidRequest(f"no change could pass this policy: {out_of_reach}")
                sealed = replace(policy, mac=self._rows.mac("control_policy", policy.fields()))
                tx.put_control_policy(sealed, new=False)
                self._audit.append(tx, [op.ok(detail=f"{old.summary()} -> {policy.summary()}")])
            return sealed

    # -- the gate -----------------------------------------------------------------------

    def require(
        self, caller: Caller, kind: str, params: dict[str, Any], key_ref: str | None = None
    ) -> None:
        """Before a gated change's transaction: return if it may proceed (single-operator
        mode, or the call carries a change id, which ``consume`` checks); otherwise record
        it as a pending change and raise ChangeProposed. ``key_ref`` names the key the
        change touches: the change records its key id under ``params["key"]``."""
        if caller.change is not None:
            return
        with self._storage.transaction() as tx:  # a refusal is the gated operation's
            policy = self._policy(tx)
            if not policy.dual:
                return
            if key_ref is not None:
                params = {**params, "key": resolve(tx, key_ref).key_id}
            now = self._clock.now()
            change = self._sealed(
                Change(
                    str(uuid.uuid4()),
                    kind,
                    changefmt.canonical(params),
                    caller.name or "",
                    format_time(now),
                    format_time(now + timedelta(seconds=policy.ttl_seconds)),
                    "",
                    PENDING,
                )
            )
            unfit = self._quorum.unfit(tx, change)
            if unfit is not None:
                raise InvalidRequest(f"the change cannot apply: {unfit}")
            tx.add_change(change)
            view = self._view(tx, change)
            self._notifier.announce(tx, "change_proposed", payload(view))
            proposed = EventBuilder(caller, "propose_change")
            proposed.note(key_id=params.get("key"), detail=f"change={change.change_id} kind={kind}")
            self._audit.append(tx, [proposed.ok()])
        raise ChangeProposed(payload(view))

    def consume(self, tx: ChangeTx, caller: Caller, kind: str, params: dict[str, Any]) -> None:
        """Inside a gated change's transaction, before it commits: return if the change may
        take effect (marking the approved change it carries applied); Forbidden or
        Conflict otherwise, and the transaction rolls back."""
        if caller.change is None:
            if self._policy(tx).dual:  # the mode changed since require()
                raise Forbidden("this change needs approvals (dual control)")
            return
        change = self._change(tx, caller.change)
        if change.kind != kind or change.params_json != changefmt.canonical(params):
            raise Forbidden(
                "the request is not the change that was approved",
                detail=f"change={change.change_id} applied as another {kind}",
            )
        view = self._ready(tx, caller, change)
        applied = self._sealed(replace(change, state=APPLIED))
        tx.update_change(applied)
        self._notifier.announce(tx, "change_applied", payload(replace(view, change=applied)))
        event = EventBuilder(caller, "apply_change").ok(
            detail=f"change={change.change_id} kind={kind} by " + ",".join(view.approvals)
        )
        self._audit.append(tx, [event])

    # -- the approvers' side --------------------------------------------------------------

    def list_changes(self, caller: Caller, state: str | None = None) -> list[ChangeView]:
        """Changes (newest first, at most MAX_LISTED), of one state if given (as shown:
        "pending" leaves out the expired ones, "expired" lists those)."""
        with self._audit.operation(caller, "list_changes"):
            caller.require(Role.ADMIN, Role.AUDITOR, Role.CUSTODIAN)
            if state is not None and state not in (*STATES, EXPIRED):
                raise InvalidRequest("state must be one of: " + ", ".join((*STATES, EXPIRED)))
            stored = [PENDING if state == EXPIRED else state] if state else list(STATES)
            with self._storage.reader() as tx:
                views = [self._listed(tx, c) for c in tx.list_changes(stored, MAX_LISTED)]
            return [v for v in views if state is None or v.state == state]

    def view(self, caller: Caller, change_id: str) -> ChangeView:
        with self._audit.operation(caller, "read_change") as op:
            caller.require(Role.ADMIN, Role.AUDITOR, Role.CUSTODIAN)
            op.note(detail=f"change={change_id}")
            with self._storage.transaction() as tx:
                return self._view(tx, self._change(tx, change_id))

    def decide(
        self, caller: Caller, change_id: str, custodian_name: str, signature: bytes, decision: str
    ) -> ChangeView:
        """Record a custodian's signed approval or rejection of a pending change; a
        rejection by a member of a group the change needs rejects it."""
        name = "approve_change" if decision == "approve" else "reject_change"
        with self._audit.operation(caller, name) as op:
            caller.require(Role.CUSTODIAN)
            op.note(detail=f"change={change_id} custodian={custodian_name}")
            if caller.name != custodian_name:
                raise Forbidden("a custodian submits only their own decisions")
            with self._storage.transaction() as tx:
                change = self._change(tx, change_id)
                view = self._view(tx, change)
                if view.state != PENDING:
                    raise Conflict(f"the change is {view.state}")
                custodian = signer(
                    self._rows.custodians(tx),
                    custodian_name,
                    change.proposer,
                    bytes.fromhex(change.digest),
                    signature,
                    decision,
                    "this change",
                )
                tx.add_change_decision(
                    change_id, ChangeDecision(custodian.name, decision, signature, self._now())
                )
                self._audit.append(tx, [op.ok()])
                view = self._view(tx, change)
                if view.vetoed:
                    change = self._sealed(replace(change, state=REJECTED))
                    tx.update_change(change)
                    view = replace(view, change=change, state=REJECTED, approved=False)
                    self._notifier.announce(tx, "change_rejected", payload(view))
                    self._audit.append(
                        tx,
                        [EventBuilder(caller, "change_rejected").ok(detail=f"change={change_id}")],
                    )
            return view

    def cancel(self, caller: Caller, change_id: str) -> ChangeView:
        """Withdraw a pending change (any admin)."""
        with self._audit.operation(caller, "cancel_change") as op:
            caller.require(Role.ADMIN)
            op.note(detail=f"change={change_id}")
            with self._storage.transaction() as tx:
                change = self._change(tx, change_id)
                view = self._view(tx, change)
                if view.state != PENDING:
                    raise Conflict(f"the change is {view.state}")
                change = self._sealed(replace(change, state=CANCELLED))
                tx.update_change(change)
                self._audit.append(tx, [op.ok()])
            return replace(view, change=change, state=CANCELLED, approved=False)

    def applicable(self, caller: Caller, change_id: str) -> Change:
        """The change, if ``caller`` proposed it and it may be applied now (the effect's
        transaction checks all of it again)."""
        with self._audit.operation(caller, "apply_change") as op:
            caller.require(Role.ADMIN)
            op.note(detail=f"change={change_id}")
            with self._storage.transaction() as tx:
                change = self._change(tx, change_id)
                self._ready(tx, caller, change)
            return change

    # -- internals ----------------------------------------------------------------------

    def _ready(self, tx: ChangeTx, caller: Caller, change: Change) -> ChangeView:
        """The change's view if ``caller`` may apply it now: its proposer; pending, not
        expired; its target still takes it; its approvals make the quorum. Forbidden or
        Conflict (saying what is missing) otherwise."""
        if change.proposer != caller.name:
            raise Forbidden("only the proposer applies a change")
        view = self._view(tx, change)
        if view.state != PENDING:
            raise Conflict(f"the change is {view.state}")
        unfit = self._quorum.unfit(tx, change)
        if unfit is not None:
            raise Conflict(f"the change no longer applies: {unfit}")
        if not view.approved:
            quorum = self.in_force(tx).quorum
            groups = ", ".join(view.required_groups)
            raise Forbidden(
                f"the change lacks approvals: it has {len(view.approvals)} of {quorum}"
                + (f", with a member of each of {groups}" if groups else ""),
                detail=f"change={change.change_id} not approved",
            )
        return view

    def _now(self) -> str:
        return format_time(self._clock.now())

    def _sealed_policy(self, tx: ChangeTx) -> ControlPolicy | None:
        """The pinned policy, checked against its seal (Forbidden if it fails: nothing
        gated proceeds); None if none is pinned (SealBroken if it was deleted)."""
        policy = tx.control_policy()
        if policy is None:
            tx.check_absent("control_policy", ident([1]))
            return None
        if not hmac.compare_digest(policy.mac, self._rows.mac("control_policy", policy.fields())):
            raise Forbidden("the control policy was altered", detail="policy row fails its seal")
        tx.check_current("control_policy", ident([1]), policy.mac)
        return policy

    def _policy(self, tx: ChangeTx) -> ControlPolicy:
        """The policy in force, pinned now (and audited) if none is yet."""
        policy = self._sealed_policy(tx)
        if policy is not None:
            return policy
        policy = replace(
            self._initial, mac=self._rows.mac("control_policy", self._initial.fields())
        )
        tx.put_control_policy(policy, new=True)
        event = EventBuilder(Caller("kms-start", None), "pin_control_policy")
        self._audit.append(tx, [event.ok(detail=policy.summary())])
        return policy

    def _sealed(self, change: Change) -> Change:
        digest = changefmt.change_digest(change.signed_fields()).hex()
        change = replace(change, digest=digest)
        return replace(change, mac=self._rows.mac("change", _sealed_fields(change)))

    def _checked(self, tx: ChangeTx, change: Change) -> Change:
        """The change if its row carries its current seal and its digest matches its
        fields; Forbidden otherwise."""
        expected = self._rows.mac("change", _sealed_fields(change))
        digest = changefmt.change_digest(change.signed_fields()).hex()
        if not hmac.compare_digest(change.mac, expected) or digest != change.digest:
            raise Forbidden("the change record was altered", detail="change row fails its seal")
        tx.check_current("change", ident([change.change_id]), change.mac)
        return change

    def _listed(self, tx: ChangeTx, change: Change) -> ChangeView:
        """The change's view; one whose row fails its checks is listed as "altered"
        (it can be neither approved nor applied), so it hides none of the others."""
        try:
            return self._view(tx, self._checked(tx, change))
        except (Forbidden, SealBroken):
            log.error("change row fails its checks", extra={"op": change.change_id})
            return ChangeView(change, "altered", [], [], [], False, False)

    def _change(self, tx: ChangeTx, change_id: str) -> Change:
        """The change, locked and checked; NotFound if there is none."""
        change = tx.change(change_id)
        if change is None:
            tx.check_absent("change", ident([change_id]))
            raise NotFound("no such change")
        return self._checked(tx, change)

    def _view(self, tx: ChangeTx, change: Change) -> ChangeView:
        policy = self.in_force(tx)
        groups = self._quorum.required_groups(tx, change, policy)
        approvers, rejecters = self._quorum.tally(tx, change)
        approved_groups = self._quorum.groups_of(tx, approvers)
        # a rejection by a needed group's member rejects; with no group needed, any does
        vetoed = bool(self._quorum.groups_of(tx, rejecters) & groups if groups else rejecters)
        state = change.state
        if state == PENDING and self._now() >= change.expires_at:
            state = EXPIRED
        approved = (
            state == PENDING
            and len(approvers) >= policy.quorum
            and groups <= approved_groups
            and not vetoed
        )
        return ChangeView(
            change, state, sorted(groups), sorted(approvers), sorted(rejecters), approved, vetoed
        )


def _sealed_fields(change: Change) -> dict[str, Any]:
    return {"change_id": change.change_id, "digest": change.digest, "state": change.state}


def check_policy(policy: ControlPolicy) -> None:
    """InvalidRequest unless the policy is one a server can run."""
    if policy.mode not in MODES:
        raise InvalidRequest("mode must be one of: " + ", ".join(MODES))
    if not 1 <= policy.quorum <= 16:
        raise InvalidRequest("quorum must be 1 to 16")
    if len(policy.required_groups) > 16 or not all(
        GROUP_RE.fullmatch(g) for g in policy.required_groups
    ):
        raise InvalidRequest("required_groups: at most 16 names of 1-64 letters, digits, _ or -")
    if not TTL_RANGE[0] <= policy.ttl_seconds <= TTL_RANGE[1]:
        raise InvalidRequest(f"ttl_seconds must be {TTL_RANGE[0]} to {TTL_RANGE[1]}")


def payload(view: ChangeView) -> dict[str, Any]:
    """A change as the API, the CLI and the data owner's webhook show it: every field its
    digest covers (for the approver to recompute it), its state and who approved."""
    c = view.change
    return {
        **c.signed_fields(),
        "digest": c.digest,
        "state": view.state,
        "required_groups": view.required_groups,
        "approvals": view.approvals,
        "rejections": view.rejections,
        "approved": view.approved,
    }
