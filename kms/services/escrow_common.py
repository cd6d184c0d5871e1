"""What the escrow services share: settings, the refusal to run unconfigured, and the
HSM-sealed access to the rows the procedure trusts.

Custodian rows and case state carry ``mac``: the row seal of kms/services/seals.py. A row
edited in the database no longer matches its seal: a custodian whose row fails is
ignored (its approvals do not count), a case whose row fails refuses every use.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from kms.errors import EscrowUnavailable, Forbidden, SealBroken
from kms.formats import escrow as escrowfmt
from kms.formats.state import ident
from kms.services.model import Custodian, EscrowCase, EscrowPolicy
from kms.services.notify import Notifier
from kms.services.ports import (
    AuditRows,
    CaseRows,
    CustodianRows,
    KeyRows,
    NotificationRows,
    PrincipalRows,
    SealRows,
)
from kms.services.seals import RowSeals

log = logging.getLogger("kms.escrow")


class SealedCustodianRows(CustodianRows, SealRows, Protocol):
    """Custodian rows with the freshness check of their seals."""


class SealedCaseRows(CaseRows, SealRows, Protocol):
    """Case rows with the freshness check of their seals."""


class EscrowTx(
    KeyRows, CaseRows, CustodianRows, NotificationRows, AuditRows, PrincipalRows, SealRows, Protocol
):
    """The rows the escrow procedure reads and writes: cases and decisions, custodians,
    the data owner's notifications, the keys a case names, the audit trail."""


@dataclass(frozen=True)
class EscrowSettings:
    policy: EscrowPolicy = field(default_factory=EscrowPolicy)
    waiting_period_seconds: int = 86400
    approval_ttl_seconds: int = 7 * 86400
    max_case_seconds: int = 90 * 86400
    endorsed_enrolment: bool = True
    # every custodian group; always includes the policy's required and veto groups
    groups: frozenset[str] = frozenset()

    def all_groups(self) -> frozenset[str]:
        return self.groups | self.policy.required_groups | self.policy.veto_groups


def require_configured(notifier: Notifier, settings: EscrowSettings) -> None:
    """Escrow runs only when the data owner can be told (a webhook) and the quorum names
    the groups that must agree (so no approval set is the admin's alone)."""
    if not notifier.configured:
        raise EscrowUnavailable(
            "escrow needs the data owner's webhook (KMS_ESCROW_WEBHOOK_URL)",
            detail="no webhook configured",
        )
    if not settings.policy.required_groups:
        raise EscrowUnavailable(
            "escrow needs required custodian groups (KMS_ESCROW_REQUIRED_GROUPS)",
            detail="no required groups configured",
        )


class SignedDecision(Protocol):
    """A custodian's signed decision (an escrow case's or a dual-control change's)."""

    @property
    def custodian(self) -> str: ...
    @property
    def decision(self) -> str: ...  # approve | reject
    @property
    def signature(self) -> bytes: ...


D = TypeVar("D", bound=SignedDecision)


def tally(
    custodians: dict[str, Custodian],
    decisions: Iterable[D],
    digest: bytes,
    author: str,
    fresh: Callable[[D], bool] = lambda d: True,
) -> tuple[set[str], set[str]]:
    """The custodians whose approval counts (active, not ``author``, signature valid over
    ``digest``, ``fresh``) and those who rejected (signature valid; a rejection stands
    even if its custodian is revoked later). One rule for cases and changes."""
    approvers, rejecters = set(), set()
    for d in decisions:
        custodian = custodians.get(d.custodian)
        if custodian is None or d.custodian == author:
            continue
        if not escrowfmt.verify(custodian.public_key, d.signature, digest, d.decision):
            continue
        if d.decision == "reject":
            rejecters.add(d.custodian)
        elif custodian.state == "active" and fresh(d):
            approvers.add(d.custodian)
    return approvers, rejecters


def signer(
    custodians: dict[str, Custodian],
    name: str,
    author: str,
    digest: bytes,
    signature: bytes,
    decision: str,
    subject: str,
) -> Custodian:
    """The custodian ``name`` whose signed ``decision`` on ``subject`` ("this version of
    the case", "this change") is recorded: registered and active, not its ``author``,
    the signature valid over ``digest``; Forbidden otherwise."""
    custodian = custodians.get(name)
    if custodian is None or custodian.state != "active":
        raise Forbidden(
            "not a registered, active custodian key", detail="unregistered or revoked custodian"
        )
    if custodian.name == author:
        raise Forbidden(f"whoever filed or proposed {subject} cannot decide on it")
    if not escrowfmt.verify(custodian.public_key, signature, digest, decision):
        raise Forbidden(
            f"the signature does not match {subject}",
            detail=f"bad signature (not over {subject}, or another key)",
        )
    return custodian


class EscrowRows:
    """Sealed reads and writes of custodian and case rows."""

    def __init__(self, seals: RowSeals) -> None:
        self._seals = seals

    def mac(self, kind: str, fields: dict[str, Any]) -> str:
        """An HSM-held HMAC over a row's fields: the database alone cannot make one."""
        return self._seals.seal(kind, fields)

    def custodian_mac(self, c: Custodian) -> str:
        return self.mac(
            "custodian",
            {"name": c.name, "group": c.group, "public_key": c.public_key.hex(), "state": c.state},
        )

    def sealed(self, c: Custodian) -> Custodian:
        return replace(c, mac=self.custodian_mac(c))

    def custodians(self, tx: SealedCustodianRows) -> dict[str, Custodian]:
        """Registered custodians whose row still carries its current HSM seal; a row
        edited in the database (a swapped public key, a revived custodian, an older copy)
        does not count. SealBroken if a custodian's row was deleted in the database (an
        emptied group would take new custodians without endorsement)."""
        out = {}
        found = tx.list_custodians()
        for c in found:
            try:
                if not hmac.compare_digest(c.mac, self.custodian_mac(c)):
                    raise SealBroken(detail="custodian row fails its seal")
                tx.check_current("custodian", ident([c.name]), c.mac)
                out[c.name] = c
            except SealBroken:
                log.error("custodian row fails its seal; ignored", extra={"op": c.name})
        tx.check_complete("custodian", {ident([c.name]) for c in found})
        return out

    def case_mac(self, case: EscrowCase) -> str:
        return self.mac(
            "case",
            {
                "case_id": case.case_id,
                "version": case.version,
                "digest": case.digest,
                "state": case.state.value,
                "active_from": case.active_from,
                "unwraps_used": case.unwraps_used,
            },
        )

    def case(self, tx: SealedCaseRows, case_id: str) -> EscrowCase | None:
        """The case (locked), refused if its row fails its HSM seal or is an older sealed
        copy of it (a refilled unwrap budget)."""
        case = tx.case(case_id)
        if case is None:
            return None
        if not hmac.compare_digest(case.mac, self.case_mac(case)):
            raise Forbidden("the case record was altered", detail="case row fails its seal")
        try:
            tx.check_current("case", ident([case_id]), case.mac)
        except SealBroken as e:
            raise Forbidden("the case record was altered", detail=e.detail) from e
        return case

    def put_case(self, tx: CaseRows, case: EscrowCase, new: bool = False) -> None:
        sealed = replace(case, mac=self.case_mac(case))
        if new:
            tx.add_case(sealed)
        else:
            tx.update_case(sealed)
