"""The dual-control tables' part of the Tx port: the control policy, proposed changes and
the approvers' decisions (kms/services/changes.py seals the rows and checks them)."""

from __future__ import annotations

import json

from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Row

from kms.backends.storage import schema as t
from kms.errors import Conflict, SealBroken
from kms.formats.state import ident
from kms.services.change_model import Change, ChangeDecision, ControlPolicy
from kms.services.ports import TxSeals

POLICY_ROW = 1


class ChangeTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection
    _seals: TxSeals

    def control_policy(self) -> ControlPolicy | None:
        row = self._c.execute(
            select(t.control_policy).where(t.control_policy.c.id == POLICY_ROW).with_for_update()
        ).first()
        if row is None:
            return None
        try:
            groups = json.loads(row.required_groups)
        except (TypeError, ValueError, RecursionError):
            groups = None
        typed = (row.mode, row.mac), (row.quorum, row.ttl_seconds)
        if not (
            isinstance(groups, list)
            and all(isinstance(g, str) for g in groups)
            and all(isinstance(v, str) for v in typed[0])
            and all(type(v) is int for v in typed[1])
        ):
            raise SealBroken(detail="the control_policy row holds what no server writes")
        return ControlPolicy(row.mode, row.quorum, frozenset(groups), row.ttl_seconds, row.mac)

    def put_control_policy(self, policy: ControlPolicy, new: bool) -> None:
        values = {
            "mode": policy.mode,
            "quorum": policy.quorum,
            "required_groups": json.dumps(sorted(policy.required_groups)),
            "ttl_seconds": policy.ttl_seconds,
            "mac": policy.mac,
        }
        table = t.control_policy
        if new:
            try:
                self._c.execute(insert(table).values(id=POLICY_ROW, **values))
            except sa_exc.IntegrityError as e:
                raise Conflict("the control policy was pinned meanwhile; try again") from e
        else:
            self._c.execute(update(table).where(table.c.id == POLICY_ROW).values(**values))
        self._seals.wrote("control_policy", ident([POLICY_ROW]), policy.mac)

    def add_change(self, change: Change) -> None:
        self._c.execute(insert(t.changes).values(**_change_row(change)))
        self._seals.wrote("change", ident([change.change_id]), change.mac)

    def update_change(self, change: Change) -> None:
        self._c.execute(
            update(t.changes)
            .where(t.changes.c.change_id == change.change_id)
            .values(**_change_row(change))
        )
        self._seals.wrote("change", ident([change.change_id]), change.mac)

    def change(self, change_id: str) -> Change | None:
        """The change, locked until the transaction ends."""
        row = self._c.execute(
            select(t.changes).where(t.changes.c.change_id == change_id).with_for_update()
        ).first()
        return _change(row) if row else None

    def list_changes(self, states: list[str], limit: int) -> list[Change]:
        """Changes in ``states``, newest first; not locked: for display."""
        c = t.changes.c
        rows = self._c.execute(
            select(t.changes)
            .where(c.state.in_(states))
            .order_by(c.created_at.desc(), c.change_id)
            .limit(limit)
        )
        return [_change(r) for r in rows]

    def add_change_decision(self, change_id: str, decision: ChangeDecision) -> None:
        try:
            self._c.execute(
                insert(t.change_decisions).values(
                    change_id=change_id,
                    custodian=decision.custodian,
                    decision=decision.decision,
                    signature=decision.signature,
                    recorded_at=decision.recorded_at,
                )
            )
        except sa_exc.IntegrityError as e:
            raise Conflict("this custodian already decided on this change") from e

    def change_decisions(self, change_id: str) -> list[ChangeDecision]:
        d = t.change_decisions.c
        rows = self._c.execute(
            select(t.change_decisions).where(d.change_id == change_id).order_by(d.recorded_at)
        )
        return [  # a value no server writes is kept as one that verifies nothing
            ChangeDecision(
                _text(r.custodian),
                _text(r.decision),
                bytes(r.signature) if isinstance(r.signature, bytes | memoryview) else b"",
                _text(r.recorded_at),
            )
            for r in rows
        ]

    def granted_keys(self, principal_id: int) -> list[str]:
        """The keys a grant row names for the principal (unchecked: read the grant itself
        with ``grant()``, which checks its seal)."""
        c = t.grants.c
        rows = self._c.execute(select(c.key_id).where(c.principal_id == principal_id))
        return sorted(r.key_id for r in rows if isinstance(r.key_id, str))


def _change_row(change: Change) -> dict[str, object]:
    return {
        "change_id": change.change_id,
        "kind": change.kind,
        "params": change.params_json,
        "proposer": change.proposer,
        "created_at": change.created_at,
        "expires_at": change.expires_at,
        "digest": change.digest,
        "state": change.state,
        "mac": change.mac,
    }


def _change(row: Row[tuple[object, ...]]) -> Change:
    """The change as stored; a column holding what no server writes reads as "", which
    fails the change's seal (kms/services/changes.py): listed as altered, never used."""
    c = t.changes.c
    columns = (c.change_id, c.kind, c.params, c.proposer, c.created_at, c.expires_at)
    return Change(*(_text(row._mapping[col]) for col in (*columns, c.digest, c.state, c.mac)))


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
