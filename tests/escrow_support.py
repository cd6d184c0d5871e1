"""Custodian steps shared by the escrow tests: a signed decision on a case, and an
endorsed enrolment (the formats of kms/formats/escrow.py, signed as a custodian would,
offline, with its own Ed25519 key)."""

from __future__ import annotations

import base64
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms.formats import escrow as escrowfmt
from tests.helpers import Api

Custodians = dict[str, tuple[dict[str, str], Ed25519PrivateKey]]  # name -> (auth, key)


def decide(
    api: Api,
    custodians: Custodians,
    case: dict[str, Any],
    who: str,
    decision: str = "approve",
    key: Ed25519PrivateKey | None = None,
) -> Any:
    """``who`` approves or rejects ``case`` (as the server shows it), signing its digest
    with its own key (or ``key``), and submits the decision with its own token."""
    headers, own_key = custodians[who]
    digest = escrowfmt.case_digest(case)
    signature = (key or own_key).sign(escrowfmt.signed_message(digest, decision))
    path = "approvals" if decision == "approve" else "rejections"
    return api.call(
        "POST",
        f"/v1/escrow/cases/{case['case_id']}/{path}",
        headers,
        json={"custodian": who, "signature": base64.b64encode(signature).decode()},
    )


def enrol(api: Api, custodians: Custodians, name: str, group: str, endorser: str) -> None:
    """Register custodian ``name`` in ``group`` (a new principal, a new key), endorsed by
    member ``endorser``; adds it to ``custodians``."""
    headers = api.principal("custodian", name)
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = custodians[endorser][1].sign(escrowfmt.enrolment_message(name, group, raw))
    body = {
        "name": name,
        "group": group,
        "public_key": base64.b64encode(raw).decode(),
        "endorsement": {"custodian": endorser, "signature": base64.b64encode(signature).decode()},
    }
    r = api.call("POST", "/v1/custodians", api.admin, json=body)
    assert r.status_code == 201, r.json
    custodians[name] = (headers, key)
