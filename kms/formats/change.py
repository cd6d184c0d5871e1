"""What approvers sign for a control-plane change (dual control, kms/services/changes.py).

A change digest binds everything an approval agrees to. It is the SHA-256 of
``b"KMS-CHANGE-1\\n"`` followed by the canonical JSON (keys sorted, separators ``,`` and
``:``, ASCII only) of::

    change_id   str   the change (a UUID)
    kind        str   what it does: create_principal, grant, issue_sigv4, issue_token,
                      register_custodian, revoke_custodian, set_escrow_policy,
                      set_xks_policy, schedule_deletion, retire_versions,
                      enable_principal,
                      set_control_policy
    params      obj   its arguments, as the proposer gave them (a key named by its key
                      id, never an alias: an alias can be moved after the approvals)
    proposer    str   principal name of the admin who proposed it
    created_at  str   "YYYY-MM-DDTHH:MM:SS.mmmZ" (UTC)
    expires_at  str   the same format; no approval counts and nothing applies after it

Approvals and rejections use the escrow signing model (kms/formats/escrow.py): an
approval is the raw Ed25519 signature of the 32-byte digest, a rejection signs
``b"KMS-ESCROW-REJECT-1\\n" + digest``, by a registered custodian's key. The prefix
"KMS-CHANGE-1" keeps a change digest from ever equalling a case digest, so an approval
of one is never an approval of the other. The client recomputes the digest from the
change's fields rather than trusting the server's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

PREFIX = b"KMS-CHANGE-1\n"
FIELDS = ("change_id", "kind", "params", "proposer", "created_at", "expires_at")


class ChangeFormatError(ValueError):
    """The change lacks a field the digest covers, or holds what JSON cannot."""


def canonical(value: Any) -> str:
    """The canonical JSON text of ``value`` (also how params are stored)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (TypeError, ValueError) as e:
        raise ChangeFormatError(f"not canonical JSON: {e}") from None


def change_digest(change: Mapping[str, Any]) -> bytes:
    """The 32-byte digest approvers sign (see module docstring)."""
    missing = [f for f in FIELDS if f not in change]
    if missing:
        raise ChangeFormatError("change is missing " + ", ".join(missing))
    body = canonical({name: change[name] for name in FIELDS})
    return hashlib.sha256(PREFIX + body.encode("ascii")).digest()
