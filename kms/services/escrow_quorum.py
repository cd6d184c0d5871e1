"""Whether the custodians' signed decisions on a case make its quorum.

Nothing stored is taken on trust: the digest is recomputed from the case's fields, every
decision's signature is checked against it with the custodian's key from a row that
still carries its HSM seal (kms/services/escrow_common.py), and only decisions on the
case's current version count. So an edit of the database can neither add an approval nor
widen a case that custodians approved.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from kms.formats import escrow as escrowfmt
from kms.formats.state import ident
from kms.services.audit_events import format_time
from kms.services.escrow_common import EscrowRows, EscrowSettings, EscrowTx, tally
from kms.services.key_use import CASE_ALTERED
from kms.services.model import EscrowCase, EscrowPolicy
from kms.services.ports import Clock


class Quorum:
    """Counts the decisions on a case under the policy its keys ask for."""

    def __init__(self, rows: EscrowRows, settings: EscrowSettings, clock: Clock) -> None:
        self._rows = rows
        self._settings = settings
        self._clock = clock

    def policy(self, tx: EscrowTx, case: EscrowCase) -> EscrowPolicy:
        """The strictest of the global policy and those of every key in the case's scope."""
        policy = self._settings.policy
        for key_id in case.scope["keys"]:
            key = tx.key_by_id(key_id)
            if key is None:  # gone from the database, with its stricter policy?
                tx.check_absent("key", ident([key_id]))
            elif key.escrow_policy is not None:
                policy = policy.merge(key.escrow_policy)
        return policy

    def tally(
        self, tx: EscrowTx, case: EscrowCase, *, fresh_only: bool
    ) -> tuple[set[str], set[str]]:
        """Custodians whose approval of this version counts (active, not the requester,
        signature valid over the digest recomputed from the case's fields, and with
        ``fresh_only`` recorded within the approval TTL), and those who rejected it (a
        rejection stands even if its custodian is revoked later)."""
        digest = escrowfmt.case_digest(signed_fields(case))
        cutoff = format_time(
            self._clock.now() - timedelta(seconds=self._settings.approval_ttl_seconds)
        )
        return tally(
            self._rows.custodians(tx),
            [d for d in tx.decisions(case.case_id) if d.version == case.version],
            digest,
            case.requester,
            lambda d: not fresh_only or d.recorded_at >= cutoff,
        )

    def verdict(
        self, tx: EscrowTx, case: EscrowCase, *, fresh_only: bool
    ) -> tuple[bool, bool, set[str]]:
        """(quorum reached, vetoed, approvers) under the case's current policy."""
        policy = self.policy(tx, case)
        approvers, rejecters = self.tally(tx, case, fresh_only=fresh_only)
        groups = {c.name: c.group for c in self._rows.custodians(tx).values()}
        vetoed = any(groups.get(r) in policy.veto_groups for r in rejecters)
        approved_groups = {groups.get(a) for a in approvers}
        quorum = len(approvers) >= policy.quorum and policy.required_groups <= approved_groups
        return quorum, vetoed, approvers

    def approvals_lost(self, tx: EscrowTx, case: EscrowCase) -> str | None:
        """Why the case can no longer be used (None: it can): the stored case must match
        its digest and its signed approvals must still make a quorum (revoked custodians no
        longer count), with no veto; so a database edit cannot activate or widen a case."""
        if escrowfmt.case_digest(signed_fields(case)).hex() != case.digest:
            return CASE_ALTERED
        quorum, vetoed, _ = self.verdict(tx, case, fresh_only=False)
        if vetoed or not quorum:
            return "vetoed" if vetoed else "quorum no longer holds"
        return None


def signed_fields(case: EscrowCase) -> dict[str, Any]:
    """The fields of the case that its digest covers, as stored."""
    return {name: getattr(case, name) for name in escrowfmt.FIELDS}
