"""What a requester files: the case request, its limits, and the case version built from
it. The scope is stored as custodians will sign it: key references resolved to key ids,
blobs reduced to their SHA-256, both sorted, and the digest (kms/formats/escrow.py) made
over exactly the fields stored, so a custodian approves what will be enforced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from kms.errors import InvalidRequest
from kms.formats import escrow as escrowfmt
from kms.services.audit_events import format_time
from kms.services.key_refs import resolve
from kms.services.model import JUSTIFICATIONS, CaseState, EscrowCase
from kms.services.ports import KeyRows

MAX_LEGAL_BASIS = 4000
MAX_REFERENCE = 200
MAX_UNWRAPS = 100_000
MAX_SCOPE_KEYS = 100
MAX_SCOPE_BLOBS = 1000
MIN_CASE_SECONDS = 60
# A case is never opened for routine processing: that is what grants are for.
CASE_JUSTIFICATIONS = JUSTIFICATIONS - {"service_processing"}


@dataclass(frozen=True)
class CaseRequest:
    """What a requester files (or amends a case to)."""

    legal_basis: str
    reference: str
    justification: str
    keys: list[str]
    context: dict[str, str] | None
    blobs: list[bytes] | None
    max_unwraps: int
    expires_in_seconds: int


def build_case(
    tx: KeyRows,
    case_id: str,
    version: int,
    requester: str,
    r: CaseRequest,
    *,
    now: datetime,
    max_case_seconds: int,
) -> EscrowCase:
    """Version ``version`` of the case, pending, with its digest; InvalidRequest for a
    request out of its limits, NotFound for a key it names that does not exist."""
    if r.justification not in CASE_JUSTIFICATIONS:
        raise InvalidRequest(
            "justification must be one of: " + ", ".join(sorted(CASE_JUSTIFICATIONS))
        )
    if not r.legal_basis.strip() or len(r.legal_basis) > MAX_LEGAL_BASIS:
        raise InvalidRequest(f"legal_basis must be 1..{MAX_LEGAL_BASIS} characters")
    if not r.reference.strip() or len(r.reference) > MAX_REFERENCE:
        raise InvalidRequest(f"reference must be 1..{MAX_REFERENCE} characters")
    if not 1 <= r.max_unwraps <= MAX_UNWRAPS:
        raise InvalidRequest(f"max_unwraps must be 1..{MAX_UNWRAPS}")
    if not MIN_CASE_SECONDS <= r.expires_in_seconds <= max_case_seconds:
        raise InvalidRequest(f"expires_in_seconds must be {MIN_CASE_SECONDS}..{max_case_seconds}")
    if not 1 <= len(r.keys) <= MAX_SCOPE_KEYS:
        raise InvalidRequest(f"scope.keys must name 1..{MAX_SCOPE_KEYS} keys")
    if r.blobs is not None and not 1 <= len(r.blobs) <= MAX_SCOPE_BLOBS:
        raise InvalidRequest(f"scope.blobs must hold 1..{MAX_SCOPE_BLOBS} blobs")
    key_ids = sorted({resolve(tx, ref).key_id for ref in r.keys})
    scope = {
        "keys": key_ids,
        "context": r.context or None,
        "blobs": sorted({hashlib.sha256(b).hexdigest() for b in r.blobs}) if r.blobs else None,
    }
    fields: dict[str, Any] = {
        "case_id": case_id,
        "version": version,
        "requester": requester,
        "legal_basis": r.legal_basis,
        "reference": r.reference,
        "justification": r.justification,
        "scope": scope,
        "max_unwraps": r.max_unwraps,
        "expires_at": format_time(now + timedelta(seconds=r.expires_in_seconds)),
    }
    return EscrowCase(
        **fields,
        unwraps_used=0,
        state=CaseState.PENDING,
        digest=escrowfmt.case_digest(fields).hex(),
        created_at=format_time(now),
    )
