"""Custodians: the escrow officers whose Ed25519 keys approve or reject cases.

A group's first members are pinned at deployment, on the server host (``kms init
--custodian``, ``pin_custodian``), and recorded in the audit trail: the API never adds
the first member of a group. Later members are registered by an admin, only into
configured groups, with an endorsement signed by a member (unless
KMS_ESCROW_ENDORSED_ENROLMENT=0); a public key belongs to one custodian; every change is
announced to the data owner. Rows are sealed by the HSM (escrow_common.py).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from typing import Any, Protocol

from kms.errors import Conflict, Forbidden, InvalidRequest, NotFound, SealBroken
from kms.formats import escrow as escrowfmt
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller, format_time, local_event
from kms.services.change_model import GROUP_RE
from kms.services.change_quorum import ChangeTx
from kms.services.changes import ChangeService
from kms.services.escrow_common import EscrowRows, EscrowSettings, require_configured
from kms.services.model import Custodian, Role
from kms.services.notify import Notifier
from kms.services.ports import (
    Clock,
    Store,
)
from kms.services.tokens import new_token, token_hash


class CustodianServiceTx(ChangeTx, Protocol):
    """The rows CustodianService reads and writes."""


class CustodianService:
    def __init__(
        self,
        storage: Store[CustodianServiceTx],
        audit: AuditTrail,
        clock: Clock,
        notifier: Notifier,
        settings: EscrowSettings,
        rows: EscrowRows,
        *,
        changes: ChangeService,
    ) -> None:
        self._changes = changes  # dual control of the custodian set (changes.py)
        self._storage = storage
        self._audit = audit
        self._clock = clock
        self._notifier = notifier
        self._settings = settings
        self._rows = rows

    def _now(self) -> str:
        return format_time(self._clock.now())

    def register_custodian(
        self,
        caller: Caller,
        name: str,
        group: str,
        public_key: bytes,
        endorsement: tuple[str, bytes] | None = None,
    ) -> Custodian:
        """Register the Ed25519 public key of a principal with role custodian into a group
        that has an active member (its first members are pinned at deployment:
        ``pin_custodian``); unless endorsement is switched off, an ``endorsement``
        (custodian name, signature) by an active member of that group is needed. The data
        owner is notified of every change to the custodians."""
        with self._audit.operation(caller, "register_custodian") as op:
            caller.require(Role.ADMIN)
            require_configured(self._notifier, self._settings)
            if not GROUP_RE.fullmatch(group):
                raise InvalidRequest("group must be 1-64 letters, digits, '_' or '-'")
            if group not in self._settings.all_groups():
                raise InvalidRequest(
                    "group must be one of the configured custodian groups: "
                    + ", ".join(sorted(self._settings.all_groups()))
                )
            if len(public_key) != 32 or not escrowfmt.valid_public_key(public_key):
                raise InvalidRequest("public_key must be a raw 32-byte Ed25519 public key")
            op.note(
                detail=f"custodian={name} group={group} key_sha256="
                + hashlib.sha256(public_key).hexdigest()[:16]
            )
            params = {
                "name": name,
                "group": group,
                "public_key": base64.b64encode(public_key).decode(),
                "endorsement": None
                if endorsement is None
                else {
                    "custodian": endorsement[0],
                    "signature": base64.b64encode(endorsement[1]).decode(),
                },
            }
            self._changes.require(caller, "register_custodian", params)
            with self._storage.transaction() as tx:
                self._changes.consume(tx, caller, "register_custodian", params)
                principal = tx.principal_by_name(name)
                if principal is None or principal.role is not Role.CUSTODIAN:
                    raise InvalidRequest("a custodian must be a principal with role custodian")
                existing = tx.list_custodians()
                if any(c.name == name for c in existing):
                    raise Conflict(f"custodian {name!r} is already registered")
                if any(c.public_key == public_key for c in existing):
                    raise Conflict("this public key belongs to another custodian")
                members = {
                    c.name: c
                    for c in self._rows.custodians(tx).values()
                    if c.group == group and c.state == "active"
                }
                if not members:
                    raise Forbidden(
                        f"group {group!r} has no active custodian: a group's first members "
                        "are pinned at deployment (kms init --custodian)",
                        detail=f"no active member in {group}",
                    )
                if self._settings.endorsed_enrolment:
                    who, signature = endorsement or ("", b"")
                    endorser = members.get(who)
                    if endorser is None or not escrowfmt.verify_enrolment(
                        endorser.public_key, signature, name, group, public_key
                    ):
                        raise Forbidden(
                            f"group {group!r} has custodians: one of them must endorse this key",
                            detail="missing or invalid endorsement",
                        )
                custodian = self._rows.sealed(
                    Custodian(name, group, public_key, "active", self._now())
                )
                tx.add_custodian(custodian)
                self._notifier.announce(tx, "custodian_registered", _custodian_payload(custodian))
                self._audit.append(tx, [op.ok()])
            return custodian

    def revoke_custodian(self, caller: Caller, name: str) -> None:
        """From now on the custodian's approvals no longer count, past ones included (its
        rejections stand). The data owner is notified. Refused (409) while the custodian
        is needed (``needed_member``): an emptied group would take its next custodian
        without endorsement, and the data owner's veto would be gone."""
        with self._audit.operation(caller, "revoke_custodian") as op:
            caller.require(Role.ADMIN)
            require_configured(self._notifier, self._settings)
            op.note(detail=f"custodian={name}")
            self._changes.require(caller, "revoke_custodian", {"name": name})
            with self._storage.transaction() as tx:
                self._changes.consume(tx, caller, "revoke_custodian", {"name": name})
                if tx.custodian(name) is None:
                    raise NotFound("no such custodian")
                # its current sealed row only: a row edited in the database is not re-sealed
                custodian = self._rows.custodians(tx).get(name)
                if custodian is None:
                    raise SealBroken(detail=f"the custodian row {name} fails its seal")
                why = self.needed_member(tx, name)
                if why is not None:
                    raise Conflict(
                        f"{name!r} is {why}: register another member (endorsed by this one) first",
                        detail=why,
                    )
                revoked = self._rows.sealed(replace(custodian, state="revoked"))
                tx.set_custodian_state(name, "revoked", revoked.mac)
                self._notifier.announce(tx, "custodian_revoked", _custodian_payload(revoked))
                self._audit.append(tx, [op.ok()])

    def pin_custodian(self, name: str, group: str, public_key: bytes) -> str | None:
        """Deployment (``kms init --custodian``, on the server host): make ``name`` the
        first custodian of ``group``, creating its principal (role custodian) if needed.
        Returns the new principal's token (None if it existed). Idempotent for the same
        name, group and key; refused (409) if the group already has an active member (add
        members then through the API, endorsed) or the key or name is taken otherwise.
        Recorded in the audit trail; the data owner is notified if a webhook is set."""
        if not GROUP_RE.fullmatch(group):
            raise InvalidRequest("group must be 1-64 letters, digits, '_' or '-'")
        if len(public_key) != 32 or not escrowfmt.valid_public_key(public_key):
            raise InvalidRequest("public_key must be a raw 32-byte Ed25519 public key")
        key_sha = hashlib.sha256(public_key).hexdigest()
        with self._storage.transaction() as tx:
            current = self._rows.custodians(tx)
            mine = current.get(name)
            if mine is not None and (mine.group, mine.public_key) == (group, public_key):
                return None  # pinned by an earlier run
            if mine is not None or tx.custodian(name) is not None:
                raise Conflict(f"custodian {name!r} is already registered")
            if any(c.public_key == public_key for c in current.values()):
                raise Conflict("this public key belongs to another custodian")
            if any(c.group == group and c.state == "active" for c in current.values()):
                raise Conflict(
                    f"group {group!r} already has custodians: add members through the API, "
                    "endorsed by one of them"
                )
            token = None
            principal = tx.principal_by_name(name)
            if principal is None:
                token = new_token()
                tx.add_principal(name, Role.CUSTODIAN, token_hash(token), self._clock.now())
            elif principal.role is not Role.CUSTODIAN:
                raise InvalidRequest(f"principal {name!r} exists with role {principal.role}")
            custodian = self._rows.sealed(Custodian(name, group, public_key, "active", self._now()))
            tx.add_custodian(custodian)
            self._notifier.announce(tx, "custodian_registered", _custodian_payload(custodian))
            detail = f"custodian={name} group={group} key_sha256={key_sha[:16]} pinned"
            self._audit.append(tx, [local_event("pin_custodian", detail)])
        return token

    def needed_member(self, tx: CustodianServiceTx, name: str) -> str | None:
        """Why custodian ``name`` must stay active (PrincipalService refuses to cut its
        principal off, ``revoke_custodian`` to revoke it), or None: it is the last active
        member of a group that an escrow policy (the deployment's or a key's) or, under
        dual control, the control policy needs, or without it fewer active custodians
        remain than the escrow quorum or the change quorum counts."""
        custodians = self._rows.custodians(tx)
        mine = custodians.get(name)
        if mine is None or mine.state != "active":
            return None
        others = [c for c in custodians.values() if c.state == "active" and c.name != name]
        control = self._changes.in_force(tx)
        needed = self._needed_groups(tx)
        if control.dual:
            needed |= control.required_groups
        if mine.group in needed and not any(c.group == mine.group for c in others):
            return f"the last active custodian of group {mine.group!r}, which a policy needs"
        quorum = max(self._settings.policy.quorum, control.quorum if control.dual else 0)
        if len(others) < quorum:
            return f"one of the {quorum} active custodians a quorum needs"
        return None

    def _needed_groups(self, tx: CustodianServiceTx) -> set[str]:
        """The groups some escrow policy requires or lets veto: the deployment's and every
        key's. A key row that fails its seal is left out (and alarmed): that key is
        refused at every use, under any case."""
        policy = self._settings.policy
        needed = set(policy.required_groups | policy.veto_groups)
        for key in tx.list_keys():
            if key.escrow_policy is not None:
                needed |= key.escrow_policy.required_groups | key.escrow_policy.veto_groups
        return needed

    # -- cases ------------------------------------------------------------------------------


def _custodian_payload(custodian: Custodian) -> dict[str, Any]:
    return {
        "name": custodian.name,
        "group": custodian.group,
        "state": custodian.state,
        "public_key_sha256": hashlib.sha256(custodian.public_key).hexdigest(),
    }
