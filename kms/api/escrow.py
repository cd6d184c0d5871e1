"""Escrow: custodians (``/v1/custodians``) and cases (``/v1/escrow/cases``)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from flask import Blueprint

from kms.api import parsing as p
from kms.api.context import caller, operation, services
from kms.api.parsing import decode_signature
from kms.errors import InvalidRequest
from kms.formats import context as ctxfmt
from kms.formats.blob import MAX_BLOB_BYTES
from kms.services.escrow import CaseView
from kms.services.escrow_filing import CaseRequest
from kms.services.model import EscrowCase
from kms.services.notify import case_payload

bp = Blueprint("escrow", __name__, url_prefix="/v1")
Json = tuple[dict[str, Any], int] | dict[str, Any]
CASE_FIELDS = {
    "legal_basis", "reference", "justification", "scope", "max_unwraps", "expires_in_seconds",
}  # fmt: skip


@bp.post("/custodians")
@operation("register_custodian")
def register_custodian() -> Json:
    """``{name, group, public_key, endorsement?: {custodian, signature}}`` (raw Ed25519
    public key and signature, base64) -> 201. A group's second and later custodians need
    an endorsement by a member (kms/formats/escrow.py)."""
    body = p.json_body(
        {"name", "group", "public_key", "endorsement"}, frozenset({"name", "group", "public_key"})
    )
    endorsement = None
    if "endorsement" in body:
        e = p.fields(
            body["endorsement"],
            {"custodian", "signature"},
            frozenset({"custodian", "signature"}),
            "endorsement",
        )
        endorsement = (
            p.required_string(e, "custodian", max_len=64),
            decode_signature(p.required_string(e, "signature", max_len=200)),
        )
    custodian = services().custodians.register_custodian(
        caller(),
        p.required_string(body, "name", max_len=64),
        p.required_string(body, "group", max_len=64),
        p.b64(body, "public_key", max_bytes=64),
        endorsement,
    )
    return {"name": custodian.name, "group": custodian.group, "state": custodian.state}, 201


@bp.delete("/custodians/<name>")
@operation("revoke_custodian")
def revoke_custodian(name: str) -> Json:
    services().custodians.revoke_custodian(caller(), name)
    return {"name": name, "state": "revoked"}


def _case_request(body: p.Body) -> CaseRequest:
    scope = p.fields(body.get("scope"), {"keys", "context", "blobs"}, frozenset({"keys"}), "scope")
    blobs = None
    if "blobs" in scope:
        raw = p.string_list(scope, "blobs", max_items=1000)
        try:
            blobs = [base64.b64decode(b, validate=True) for b in raw]
        except (binascii.Error, ValueError):
            raise InvalidRequest("scope.blobs must be base64 blobs") from None
        if any(len(b) > MAX_BLOB_BYTES for b in blobs):
            raise InvalidRequest("scope.blobs holds an oversized blob")
    try:
        context = ctxfmt.validate(scope["context"]) if scope.get("context") is not None else None
    except ctxfmt.ContextError as e:
        raise InvalidRequest(f"scope.context: {e}") from None
    return CaseRequest(
        legal_basis=p.required_string(body, "legal_basis", max_len=4000),
        reference=p.required_string(body, "reference", max_len=200),
        justification=p.required_string(body, "justification", max_len=32),
        keys=p.string_list(scope, "keys", max_items=100),
        context=context,
        blobs=blobs,
        max_unwraps=p.integer(body, "max_unwraps"),
        expires_in_seconds=p.integer(body, "expires_in_seconds"),
    )


def _case(case: EscrowCase) -> dict[str, Any]:
    out = case_payload(case)
    out["digest"] = base64.b64encode(bytes.fromhex(case.digest)).decode()
    out["unwraps_used"] = case.unwraps_used
    out["created_at"] = case.created_at
    return out


def _view(view: CaseView) -> dict[str, Any]:
    return {
        **_case(view.case),
        "policy": {
            "quorum": view.policy.quorum,
            "required_groups": sorted(view.policy.required_groups),
            "veto_groups": sorted(view.policy.veto_groups),
        },
        "approvals": view.approvals,
        "rejections": view.rejections,
        "notifications": view.notifications,
    }


@bp.post("/escrow/cases")
@operation("file_case")
def file_case() -> Json:
    """``{legal_basis, reference, justification, scope: {keys, context?, blobs?},
    max_unwraps, expires_in_seconds}`` -> 201 ``{case_id, state, digest, ...}``."""
    body = p.json_body(CASE_FIELDS, frozenset(CASE_FIELDS))
    return _case(services().escrow.file(caller(), _case_request(body))), 201


@bp.put("/escrow/cases/<case_id>")
@operation("amend_case")
def amend_case(case_id: str) -> Json:
    """The same body as filing: a new version, back to pending."""
    body = p.json_body(CASE_FIELDS, frozenset(CASE_FIELDS))
    return _case(services().escrow.amend(caller(), case_id, _case_request(body)))


@bp.get("/escrow/cases/<case_id>")
@operation("read_case")
def get_case(case_id: str) -> Json:
    return _view(services().escrow.view(caller(), case_id))


def _decide(case_id: str, decision: str) -> Json:
    body = p.json_body({"custodian", "signature"}, frozenset({"custodian", "signature"}))
    signature = decode_signature(p.required_string(body, "signature", max_len=200))
    case = services().escrow.decide(
        caller(), case_id, p.required_string(body, "custodian", max_len=64), signature, decision
    )
    return _case(case), 201


@bp.post("/escrow/cases/<case_id>/approvals")
@operation("approve_case")
def approve(case_id: str) -> Json:
    """``{custodian, signature}``: base64 Ed25519 signature of the case digest."""
    return _decide(case_id, "approve")


@bp.post("/escrow/cases/<case_id>/rejections")
@operation("reject_case")
def reject(case_id: str) -> Json:
    """``{custodian, signature}``: signature of ``b"KMS-ESCROW-REJECT-1\\n" + digest``."""
    return _decide(case_id, "reject")


@bp.post("/escrow/cases/<case_id>/revoke")
@operation("revoke_case")
def revoke(case_id: str) -> Json:
    p.json_body(set())
    return _case(services().escrow.revoke(caller(), case_id))


@bp.post("/escrow/cases/<case_id>/close")
@operation("close_case")
def close(case_id: str) -> Json:
    p.json_body(set())
    return _case(services().escrow.close(caller(), case_id))
