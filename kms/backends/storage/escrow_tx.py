"""The escrow tables' part of the Tx port (custodians, cases, decisions, the outbox)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Row

from kms.backends.storage import schema as t
from kms.errors import Conflict
from kms.formats.state import ident
from kms.services.model import CaseState, Custodian, Decision, EscrowCase, Notification
from kms.services.ports import TxSeals


class EscrowTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection
    _seals: TxSeals

    def add_custodian(self, custodian: Custodian) -> None:
        try:
            self._c.execute(
                insert(t.custodians).values(
                    name=custodian.name,
                    custodian_group=custodian.group,
                    public_key=custodian.public_key,
                    state=custodian.state,
                    created_at=custodian.created_at,
                    mac=custodian.mac,
                )
            )
        except sa_exc.IntegrityError as e:
            raise Conflict(f"custodian {custodian.name!r} is already registered") from e
        self._seals.wrote("custodian", ident([custodian.name]), custodian.mac)

    def custodian(self, name: str) -> Custodian | None:
        row = self._c.execute(select(t.custodians).where(t.custodians.c.name == name)).first()
        return _custodian(row) if row else None

    def list_custodians(self) -> list[Custodian]:
        return [_custodian(r) for r in self._c.execute(select(t.custodians))]

    def set_custodian_state(self, name: str, state: str, mac: str) -> None:
        self._c.execute(
            update(t.custodians).where(t.custodians.c.name == name).values(state=state, mac=mac)
        )
        self._seals.wrote("custodian", ident([name]), mac)

    def add_case(self, case: EscrowCase) -> None:
        self._c.execute(insert(t.escrow_cases).values(**_case_row(case)))
        self._seals.wrote("case", ident([case.case_id]), case.mac)

    def update_case(self, case: EscrowCase) -> None:
        self._c.execute(
            update(t.escrow_cases)
            .where(t.escrow_cases.c.case_id == case.case_id)
            .values(**_case_row(case))
        )
        self._seals.wrote("case", ident([case.case_id]), case.mac)

    def case(self, case_id: str) -> EscrowCase | None:
        row = self._c.execute(
            select(t.escrow_cases).where(t.escrow_cases.c.case_id == case_id).with_for_update()
        ).first()
        return _case(row) if row else None

    def list_cases(self, states: Sequence[str]) -> list[EscrowCase]:
        """Cases in ``states`` (CaseState values), oldest first; not locked: for display."""
        c = t.escrow_cases.c
        rows = self._c.execute(
            select(t.escrow_cases)
            .where(c.state.in_([str(s) for s in states]))
            .order_by(c.created_at, c.case_id)
        )
        return [_case(r) for r in rows]

    def add_decision(self, case_id: str, decision: Decision) -> None:
        try:
            self._c.execute(
                insert(t.escrow_decisions).values(
                    case_id=case_id,
                    version=decision.version,
                    custodian=decision.custodian,
                    decision=decision.decision,
                    signature=decision.signature,
                    recorded_at=decision.recorded_at,
                )
            )
        except sa_exc.IntegrityError as e:
            raise Conflict("this custodian already decided on this version of the case") from e

    def decisions(self, case_id: str) -> list[Decision]:
        d = t.escrow_decisions.c
        rows = self._c.execute(
            select(t.escrow_decisions).where(d.case_id == case_id).order_by(d.recorded_at)
        )
        return [
            Decision(r.custodian, r.decision, r.version, bytes(r.signature), r.recorded_at)
            for r in rows
        ]

    def add_notification(self, notification: Notification) -> None:
        values = {k: v for k, v in notification.__dict__.items() if k != "id"}
        self._c.execute(insert(t.notifications).values(**values))

    def claim_notifications(self, now: str, lease_until: str, limit: int) -> list[Notification]:
        """Pending notifications due at ``now``, leased to the caller until ``lease_until``
        (a worker that dies mid-delivery leaves them due again after the lease)."""
        n = t.notifications.c
        rows = self._c.execute(
            select(t.notifications)
            .where(n.state == "pending", n.next_attempt_at <= now)
            .order_by(n.id)
            .limit(limit)
        ).all()
        claimed = []
        for row in rows:
            done = self._c.execute(
                update(t.notifications)
                .where(n.id == row.id, n.next_attempt_at == row.next_attempt_at)
                .values(next_attempt_at=lease_until)
            )
            if done.rowcount == 1:
                claimed.append(Notification(**row._asdict()))
        return claimed

    def update_notification(self, notification: Notification) -> None:
        values = {k: v for k, v in notification.__dict__.items() if k != "id"}
        self._c.execute(
            update(t.notifications).where(t.notifications.c.id == notification.id).values(**values)
        )

    def notifications(self, case_id: str) -> list[Notification]:
        n = t.notifications.c
        rows = self._c.execute(select(t.notifications).where(n.case_id == case_id).order_by(n.id))
        return [Notification(**r._asdict()) for r in rows]


def _custodian(row: Row[Any]) -> Custodian:
    return Custodian(
        row.name, row.custodian_group, bytes(row.public_key), row.state, row.created_at, row.mac
    )


def _case(row: Row[Any]) -> EscrowCase:
    values = row._asdict()
    values["scope"] = json.loads(values["scope"])
    values["state"] = CaseState(values["state"])
    return EscrowCase(**values)


def _case_row(case: EscrowCase) -> dict[str, Any]:
    values = dict(case.__dict__)
    values["scope"] = json.dumps(case.scope, sort_keys=True)
    values["state"] = case.state.value
    return values
