"""The XKS per-key policy table's part of the Tx port. Policy rows are sealed
(kms/services/seals.py): one edited outside the server is never used."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import delete, insert
from sqlalchemy.engine import Connection

from kms.backends.storage import prepared
from kms.backends.storage import schema as t
from kms.formats.state import ident
from kms.formats.xks import USAGES, XksKeyPolicy
from kms.services.ports import TxSeals
from kms.services.seals import parsed, xks_policy_fields


class XksTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection
    _seals: TxSeals

    def xks_policy(self, key_id: str) -> XksKeyPolicy | None:
        """On the DBAPI cursor: every XKS request decides on it twice."""
        rows = prepared.XKS_POLICY.rows(self._c, {"key_id": key_id})
        if not rows:  # the default policy, unless the row was deleted in the database
            self._seals.absent("xks_policy", ident([key_id]))
            return None
        usage, principals, operations, seal = rows[0]
        policy = parsed(
            "xks_policy",
            key_id,
            lambda: XksKeyPolicy(
                frozenset(u for u in usage.split(",") if u), _load(principals), _load(operations)
            ),
        )
        self._seals.check("xks_policy", xks_policy_fields(key_id, policy), seal)
        return policy

    def put_xks_policy(self, key_id: str, policy: XksKeyPolicy, now: str) -> None:
        c = t.xks_key_policies.c
        self._c.execute(delete(t.xks_key_policies).where(c.key_id == key_id))
        self._c.execute(
            insert(t.xks_key_policies).values(
                key_id=key_id,
                usage=",".join(u for u in USAGES if u in policy.usage),
                aws_principals=_dump(policy.aws_principals),
                kms_operations=_dump(policy.kms_operations),
                updated_at=now,
                seal=self._seals.seal("xks_policy", xks_policy_fields(key_id, policy)),
            )
        )


def xks_policy_row(row: Any) -> XksKeyPolicy:
    """The policy of a row of xks_key_policies."""
    usage = frozenset(u for u in row.usage.split(",") if u)
    return XksKeyPolicy(usage, _load(row.aws_principals), _load(row.kms_operations))


def _dump(values: tuple[str, ...] | None) -> str | None:
    return None if values is None else json.dumps(list(values))


def _load(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(str(v) for v in json.loads(text))
