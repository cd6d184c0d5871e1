"""The audit trail's part of the Tx port: the chained records, the head row and the
signed checkpoints. The chain logic lives in kms/services/audit.py; the head row is read
``FOR UPDATE`` so that appends are serialised on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection

from kms.backends.storage import prepared
from kms.backends.storage import schema as t
from kms.services.model import AuditHead, AuditQuery


class AuditTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection

    def audit_head(self) -> AuditHead:
        (seq, hash_, checkpoint_seq, archived_seq), *_ = prepared.AUDIT_HEAD.rows(self._c, {})
        return AuditHead(int(seq), str(hash_), int(checkpoint_seq), int(archived_seq))

    def audit_chain_id(self) -> str | None:
        chain_id = self._c.execute(
            select(t.audit_head.c.chain_id).where(t.audit_head.c.id == 1)
        ).scalar_one()
        return None if chain_id is None else str(chain_id)

    def set_audit_chain_id(self, chain_id: str) -> None:
        self._c.execute(
            update(t.audit_head).where(t.audit_head.c.id == 1).values(chain_id=chain_id)
        )

    def insert_audit(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        prepared.AUDIT_INSERT.execute(self._c, records)
        last = records[-1]
        prepared.AUDIT_HEAD_MOVE.execute(self._c, [{"seq": last["seq"], "hash": last["hash"]}])

    def audit_records(
        self, after: int, limit: int, until: int | None = None, query: AuditQuery | None = None
    ) -> list[dict[str, Any]]:
        r = t.audit_records.c
        stmt = select(t.audit_records).where(r.seq > after)
        if until is not None:
            stmt = stmt.where(r.seq <= until)
        if query is not None:
            for column, value in (
                (r.key_id, query.key_id),
                (r.principal, query.principal),
                (r.operation, query.operation),
                (r.outcome, query.outcome),
                (r.case_id, query.case_id),
            ):
                if value is not None:
                    stmt = stmt.where(column == value)
            if query.since is not None:
                stmt = stmt.where(r.time >= query.since)
            if query.until is not None:
                stmt = stmt.where(r.time < query.until)
            if query.context_hashes is not None:
                stmt = stmt.where(r.context_sha256.in_(query.context_hashes))
        rows = self._c.execute(stmt.order_by(r.seq).limit(limit))
        return [row._asdict() for row in rows]

    def audit_links(self, after: int, until: int, limit: int) -> list[tuple[int, str, str]]:
        r = t.audit_records.c
        rows = self._c.execute(
            select(r.seq, r.prev_hash, r.hash)
            .where(r.seq > after, r.seq <= until)
            .order_by(r.seq)
            .limit(limit)
        )
        return [(int(seq), str(prev), str(hash_)) for seq, prev, hash_ in rows]

    def audit_counts(self, since: str, until: str) -> list[dict[str, Any]]:
        r = t.audit_records.c
        escrow = r.case_id.is_not(None).label("escrow")
        cols = (r.key_id, r.principal, r.operation, r.outcome, r.justification, escrow)
        rows = self._c.execute(
            select(*cols, func.count().label("count"))
            .where(r.time >= since, r.time < until)
            .group_by(*cols)
        )
        return [row._asdict() for row in rows]

    def insert_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store a checkpoint of format 1 or 2 (its version shows in whether it has the
        state columns: NULL in format 1)."""
        self._c.execute(
            insert(t.audit_checkpoints).values(
                {k: v for k, v in checkpoint.items() if k not in ("v", "type")}
            )
        )
        self._c.execute(
            update(t.audit_head)
            .where(t.audit_head.c.id == 1)
            .values(checkpoint_seq=checkpoint["seq"])
        )

    def checkpoints(self, after: int, until: int | None, limit: int) -> list[dict[str, Any]]:
        c = t.audit_checkpoints.c
        stmt = select(t.audit_checkpoints).where(c.seq > after)
        if until is not None:
            stmt = stmt.where(c.seq <= until)
        rows = self._c.execute(stmt.order_by(c.seq).limit(limit))
        return [_checkpoint(row._asdict()) for row in rows]

    def archive_audit_through(self, seq: int) -> int:
        deleted = self._c.execute(
            delete(t.audit_records).where(t.audit_records.c.seq <= seq)
        ).rowcount
        self._c.execute(update(t.audit_head).where(t.audit_head.c.id == 1).values(archived_seq=seq))
        return int(deleted)


_STATE_COLUMNS = ("state_seq", "state_sha256")


def _checkpoint(row: dict[str, Any]) -> dict[str, Any]:
    """A stored checkpoint as signed (kms/formats/checkpoint.py): format 2 if it carries
    the sealed state, format 1 (without the state keys) if not."""
    if row["state_seq"] is None:
        return {"v": 1, **{k: v for k, v in row.items() if k not in _STATE_COLUMNS}}
    return {"v": 2, **row}
