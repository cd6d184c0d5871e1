"""The sealed state's part of the Tx port: every sealed row's (kind, ident, seal), and the
``state_changes`` log that lets a process follow the changes other processes commit
(kms/services/state_index.py, kms/formats/state.py)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection

from kms.backends.storage import schema as t
from kms.errors import StateRefused
from kms.formats.state import NO_SEAL, Entry, ident

# kind -> (table, key columns, seal column): the identity of kms/services/seals.py ROW_KEY
SEALED_TABLES = {
    "principal": (t.principals, ("id",), "seal"),
    "token": (t.tokens, ("token_sha256",), "seal"),
    "key": (t.keys, ("key_id",), "seal"),
    "key_version": (t.key_versions, ("key_id", "version"), "seal"),
    "grant": (t.grants, ("key_id", "principal_id"), "seal"),
    "sigv4_credential": (t.sigv4_credentials, ("access_key_id",), "seal"),
    "xks_policy": (t.xks_key_policies, ("key_id",), "seal"),
    "custodian": (t.custodians, ("name",), "mac"),
    "case": (t.escrow_cases, ("case_id",), "mac"),
    "change": (t.changes, ("change_id",), "mac"),
    "control_policy": (t.control_policy, ("id",), "mac"),
}
_PAGE = 10_000


class StateTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection

    def sealed_rows(self) -> Iterator[Entry]:
        """Every row of every sealed table as (kind, ident, seal or "-"), one snapshot;
        StateRefused for a key column no server writes (SQLite keeps any value)."""
        for kind, (table, keys, seal_column) in SEALED_TABLES.items():
            columns = [table.c[k] for k in keys]
            query = select(*columns, table.c[seal_column]).order_by(*columns)
            for row in self._c.execute(query).yield_per(_PAGE):
                *values, seal = row
                if not all(isinstance(v, str | int) for v in values):
                    raise StateRefused(detail=f"a {kind} row has a key no server writes")
                yield kind, ident(values), seal if isinstance(seal, str) else NO_SEAL

    def state_seq(self) -> int:
        """The newest ``n`` in the log (0 if it is empty)."""
        c = t.state_changes.c
        n = self._c.execute(select(func.coalesce(func.max(c.n), 0))).scalar_one()
        if type(n) is not int:
            raise StateRefused(detail="the state log holds a change no server writes")
        return n

    def state_changes(self, after: int) -> list[tuple[int, str, str, str | None]]:
        """The logged changes with ``n > after`` as (n, kind, ident, seal or None), in order."""
        c = t.state_changes.c
        query = select(c.n, c.kind, c.ident, c.seal).where(c.n > after).order_by(c.n)
        out = []
        for n, kind, row, seal in self._c.execute(query):
            if not (type(n) is int and isinstance(kind, str) and isinstance(row, str)):
                raise StateRefused(detail="the state log holds a change no server writes")
            out.append((n, kind, row, seal if isinstance(seal, str) else None))
        return out

    def add_state_changes(self, n: int, changes: Mapping[tuple[str, str], str | None]) -> None:
        rows = [{"n": n, "kind": k, "ident": i, "seal": s} for (k, i), s in changes.items()]
        self._c.execute(insert(t.state_changes), rows)
