"""The records of one encryption context, for admins and auditors.

Records hold a keyed hash of the context (kms/services/context_hash.py) that nobody can
compute without the HSM; this service computes it for an auditor who names a context and
returns the records that carry it, or the unkeyed SHA-256 that records written before
keyed hashes carry. Each query is itself recorded (operation ``read_audit_context``),
with the context's keyed hash and never the context, so the trail shows who looked for
which context, as it shows who opened it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kms.services.audit import AuditTrail, check_page
from kms.services.audit_events import Caller
from kms.services.context_hash import ContextHasher
from kms.services.model import AuditQuery, Role
from kms.services.ports import AuditRows, Store


class ContextAudit:
    """Reads the audit rows by context; appends the query's own record."""

    def __init__(self, storage: Store[AuditRows], trail: AuditTrail, hasher: ContextHasher) -> None:
        self._storage = storage
        self._trail = trail
        self._hasher = hasher

    def records(
        self,
        caller: Caller,
        context: dict[str, str],
        after: int,
        limit: int,
        query: AuditQuery | None = None,
    ) -> list[dict[str, Any]]:
        """One page (seq > ``after``, at most ``limit``, chain order) of the records of the
        validated ``context`` that also match ``query``. The query's record is committed
        before the page is returned; if it cannot be, nothing is returned
        (StorageUnavailable), and if the HSM cannot hash the context, nothing is read
        (HsmUnavailable)."""
        with self._trail.operation(caller, "read_audit_context") as op:
            caller.require(Role.ADMIN, Role.AUDITOR)
            check_page(after, limit)
            hashes = self._hasher.matching(context)
            op.note(context_sha256=hashes[0])
            wanted = replace(query or AuditQuery(), context_hashes=hashes)
            with self._storage.reader() as tx:
                found = tx.audit_records(after, limit, query=wanted)
            self._trail.record([op.ok(detail=f"after={after} found={len(found)}")])
            return found
