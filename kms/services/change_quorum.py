"""Which approvals a dual-control change needs, and which of its decisions count
(kms/services/changes.py).

A change needs ``quorum`` approvals by distinct active custodians other than its
proposer, whose signatures verify over the digest recomputed from the change's fields,
and at least one from each needed group:

- the policy's ``required_groups``;
- for a change to a key (a grant, its escrow or XKS policy, its deletion): every group
  that oversees the key's escrow cases (the required and veto groups of the global escrow
  policy merged with the key's own): the data owner co-signs what touches its keys;
- for a credential (SigV4 or a token) of a principal, or enabling it again: those groups
  of every key the principal may use to obtain plaintext (datakey, decrypt, xks_decrypt);
- for a custodian registered in or revoked from a group: that group's own members.

Groups are computed from the state when the change is shown or applied, so a key whose
policy grew stricter meanwhile needs the stricter set. A rejection by a member of a
needed group rejects the change (it stands even if its custodian is revoked later).
"""

from __future__ import annotations

from typing import Any, Protocol

from kms.errors import InvalidRequest
from kms.formats.state import ident
from kms.services.change_model import (
    CREDENTIAL_KINDS,
    KEY_KINDS,
    SINGLE_OPERATOR,
    Change,
    ChangeRows,
    ControlPolicy,
)
from kms.services.escrow_common import EscrowRows, EscrowSettings, tally
from kms.services.key_params import check_min_version
from kms.services.model import KeyState, Permission, Role
from kms.services.ports import (
    AuditRows,
    CustodianRows,
    GrantRows,
    KeyRows,
    NotificationRows,
    PrincipalRows,
    SealRows,
)

PLAINTEXT_OPS = frozenset({Permission.DATAKEY, Permission.DECRYPT, Permission.XKS_DECRYPT})


class ChangeTx(
    ChangeRows,
    KeyRows,
    GrantRows,
    CustodianRows,
    NotificationRows,
    AuditRows,
    PrincipalRows,
    SealRows,
    Protocol,
):
    """The rows dual control reads and writes."""


class ChangeQuorum:
    def __init__(self, rows: EscrowRows, escrow: EscrowSettings) -> None:
        self._rows = rows
        self._escrow = escrow

    def required_groups(self, tx: ChangeTx, change: Change, policy: ControlPolicy) -> set[str]:
        """Every group with a member among the approvers the change needs (see module)."""
        groups = set(policy.required_groups)
        params = change.params
        if change.kind in KEY_KINDS:
            groups |= self._key_groups(tx, str(params.get("key", "")))
        elif change.kind in CREDENTIAL_KINDS:
            principal = tx.principal_by_name(str(params.get("name", "")))
            if principal is not None:
                for key_id in tx.granted_keys(principal.id):
                    if tx.grant(key_id, principal.id).operations & PLAINTEXT_OPS:
                        groups |= self._key_groups(tx, key_id)
        elif change.kind == "register_custodian":
            groups.add(str(params.get("group", "")))
        elif change.kind == "revoke_custodian":
            custodian = self._rows.custodians(tx).get(str(params.get("name", "")))
            if custodian is not None:
                groups.add(custodian.group)
        return groups

    def unfit(self, tx: ChangeTx, change: Change) -> str | None:
        """Why the change's target does not take it (None: it does), checked when it is
        proposed (no approvals are asked for what cannot apply) and again when it is
        applied (its target may have moved on): a key deleted or pending deletion; a
        principal gone, disabled, or a grantee that is not a service; a custodian key
        for a principal that is not a custodian, or one already registered; a custodian
        to revoke that is not registered."""
        params = change.params
        if change.kind in KEY_KINDS:
            key = tx.key_by_id(str(params.get("key", "")))
            if key is None or key.state in (KeyState.PENDING_DELETION, KeyState.DESTROYED):
                return "its key is deleted or pending deletion"
            if change.kind == "retire_versions":
                try:
                    check_min_version(key, int(params.get("min_decryption_version") or 0))
                except InvalidRequest as e:
                    return e.message
        if change.kind == "set_control_policy" and params.get("mode") != SINGLE_OPERATOR:
            return self.out_of_reach(tx, params)
        name = {"grant": params.get("principal"), "register_custodian": params.get("name")}.get(
            change.kind, params.get("name") if change.kind in CREDENTIAL_KINDS else None
        )
        if name is not None:
            principal = tx.principal_by_name(str(name))
            if principal is None:
                return f"there is no principal {name}"
            if principal.disabled and change.kind != "enable_principal":
                return f"principal {name} is disabled"
            if change.kind == "grant" and principal.role is not Role.SERVICE:
                return "grants can only be given to principals with role service"
            if change.kind == "register_custodian" and principal.role is not Role.CUSTODIAN:
                return "a custodian must be a principal with role custodian"
        if change.kind in ("register_custodian", "revoke_custodian"):
            registered = tx.custodian(str(params.get("name", ""))) is not None
            if registered == (change.kind == "register_custodian"):
                return "that custodian is " + ("already" if registered else "not") + " registered"
        return None

    def out_of_reach(self, tx: ChangeTx, policy: dict[str, Any]) -> str | None:
        """Why no change could ever pass under ``policy`` (fields as ControlPolicy.fields()),
        or None: fewer active custodians than its quorum, or a required group with no
        active member. Such a policy would lock the control plane, itself included."""
        active = [c for c in self._rows.custodians(tx).values() if c.state == "active"]
        quorum = int(policy.get("quorum") or 0)
        if len(active) < quorum:
            return f"only {len(active)} active custodians for a quorum of {quorum}"
        missing = set(policy.get("required_groups") or ()) - {c.group for c in active}
        if missing:
            return "no active custodian in group " + ", ".join(sorted(missing))
        return None

    def _key_groups(self, tx: ChangeTx, key_id: str) -> set[str]:
        policy = self._escrow.policy
        key = tx.key_by_id(key_id)
        if key is None:
            tx.check_absent("key", ident([key_id]))
        elif key.escrow_policy is not None:
            policy = policy.merge(key.escrow_policy)
        return set(policy.required_groups | policy.veto_groups)

    def tally(self, tx: ChangeTx, change: Change) -> tuple[set[str], set[str]]:
        """Custodians whose approval counts (active, not the proposer, signature valid
        over the digest of the change as stored) and those who rejected it."""
        decisions = tx.change_decisions(change.change_id)
        digest = bytes.fromhex(change.digest)
        return tally(self._rows.custodians(tx), decisions, digest, change.proposer)

    def groups_of(self, tx: ChangeTx, names: set[str]) -> set[str]:
        custodians = self._rows.custodians(tx)
        return {custodians[n].group for n in names if n in custodians}
