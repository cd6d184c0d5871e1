"""The audit export bundle: JSON Lines (``application/x-ndjson``), self-contained.

Line 1 is the header; then every record of the segment in chain order; then every
checkpoint whose ``seq`` falls inside the segment, in order::

    {"type": "header", "v": 1, "after": A, "until": U, "head": H, "public_key": "<PEM>"}
    {"type": "record", <every audit record field>, "hash": "<hex>"}      (seq A+1 .. U)
    {"type": "checkpoint", <every checkpoint field>}                    (A < seq <= U)

``after`` is the seq the segment continues from (0 = the start of the chain), ``until``
the last seq it holds and ``head`` the chain head when it was exported. The header is not
signed: the verifier takes the segment's bounds from the records and trusts nothing in
the header but compares its public key with the one the auditor trusts. Record fields
are those of kms/formats/audit_record.py, checkpoint fields those of
kms/formats/checkpoint.py (format 1 or 2; a bundle may hold both). The sealed rows that
format 2 checkpoints sign travel beside the bundle, in a state export
(kms/formats/state_export.py).
"""

from __future__ import annotations

import json
from typing import Any

FORMAT_VERSION = 1
MAX_LINE_BYTES = 64 * 1024


class BundleLineError(ValueError):
    """One line of a bundle is not a JSON object of a known type."""


def header(after: int, until: int, head: int, public_key_pem: str) -> dict[str, Any]:
    return {
        "type": "header",
        "v": FORMAT_VERSION,
        "after": after,
        "until": until,
        "head": head,
        "public_key": public_key_pem,
    }


def line(obj: dict[str, Any]) -> str:
    """One bundle line (newline-terminated), keys sorted for stable output."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def parse_line(raw: str | bytes) -> dict[str, Any]:
    """A bundle line as a dict with a known ``type``; BundleLineError otherwise."""
    if len(raw) > MAX_LINE_BYTES:
        raise BundleLineError("line too long")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise BundleLineError("not valid JSON") from None
    if not isinstance(obj, dict):
        raise BundleLineError("not a JSON object")
    if obj.get("type") not in ("header", "record", "checkpoint"):
        raise BundleLineError("unknown or missing type")
    return obj
