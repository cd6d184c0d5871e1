"""``kms audit export-state``: the sealed rows, tied to a checkpoint signed just before, for
the offline verifier (``kms audit verify --state``; kms/formats/state_export.py).

A format 2 checkpoint signs only the public digest of the sealed rows. The export gives
the auditor the rows themselves, at the very change ``n`` a checkpoint signed, so that a
row the database shows now (or showed when it was exported) is checked against what the
HSM anchored, offline, beside the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kms.errors import Conflict, StateRefused
from kms.formats import state_export
from kms.formats.state import public_digest
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller

RETRIES = 3  # a writer may change a sealed row between the checkpoint and the read


@dataclass(frozen=True)
class StateSnapshot:
    checkpoint: dict[str, Any]  # the signed checkpoint whose state_seq is state_seq
    state_seq: int
    rows: int
    data: bytes  # the export file (kms/formats/state_export.py)


def export_state(trail: AuditTrail) -> StateSnapshot:
    """The sealed rows as verified against the HSM state anchor, at the change a checkpoint
    signed now carries (local operator command). The export is recorded first
    (``export_state``), so that checkpoint covers it. StateRefused (recorded, nothing
    exported) if the rows do not match the anchor; Conflict if sealed rows kept changing
    through every retry."""
    caller = Caller(request_id="kms-cli", principal=None)
    with trail.operation(caller, "export_state") as op:
        state = trail.sealed_state
        if state is None:
            raise StateRefused(detail="this process does not follow the sealed state")
        for attempt in range(1 + RETRIES):
            # a record of its own each time: the head moves, so a new checkpoint is signed
            trail.record([op.ok(detail=f"attempt {attempt + 1}")])
            checkpoint = trail.checkpoint()
            n, entries = state.verified_state()
            if (
                checkpoint is not None
                and checkpoint.get("state_seq") == n
                and checkpoint.get("state_sha256") == public_digest(entries)
            ):
                data = state_export.encode(n, entries)
                return StateSnapshot(checkpoint, n, len(entries), data)
        raise Conflict(
            f"sealed rows kept changing while the state was exported ({1 + RETRIES} tries); "
            "try again"
        )
