"""Data-key operations: ``/v1/keys/<ref>/datakey``, ``/v1/keys/<ref>/encrypt``,
``/v1/decrypt``, ``/v1/rewrap``.

Each takes either one request object or ``{"items": [...]}`` (1 to 1000 objects of the
same shape) and answers the single result or ``{"results": [...]}``, where each result is
the single form or ``{"error": {...}}``. Binary fields are standard base64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flask import Blueprint

from kms.api import parsing as p
from kms.api import serialize
from kms.api.context import caller, operation, services
from kms.errors import ClientError, InvalidRequest
from kms.formats.blob import MAX_BLOB_BYTES
from kms.services.crypto import (
    MAX_PLAINTEXT,
    DataKeyRequest,
    DecryptRequest,
    EncryptRequest,
    Opened,
    RewrapRequest,
    Sealed,
)
from kms.services.model import DEFAULT_JUSTIFICATION

bp = Blueprint("crypto", __name__, url_prefix="/v1")
T = TypeVar("T")
Result = Sealed | Opened | ClientError


def _single_or_batch(
    allowed: set[str],
    required: frozenset[str],
    parse_item: Callable[[p.Body], T],
    call: Callable[[Sequence[T]], Sequence[Result]],
) -> dict[str, Any]:
    body = p.json_body(allowed | {"items"})
    if "items" not in body:
        (result,) = call([parse_item(p.fields(body, allowed, required, "body"))])
        if isinstance(result, ClientError):
            raise result
        return serialize.item(result)
    p.fields(body, {"items"}, frozenset(), "body")
    items = body["items"]
    if not isinstance(items, list):
        raise InvalidRequest("items must be a list of objects")
    parsed = []
    for i, raw in enumerate(items):
        try:
            parsed.append(parse_item(p.fields(raw, allowed, required, f"items[{i}]")))
        except InvalidRequest as e:
            raise InvalidRequest(f"items[{i}]: {e.message}") from None
    return {"results": [serialize.item(r) for r in call(parsed)]}


def _justification(body: p.Body) -> str:
    return p.string(body, "justification", max_len=32) or DEFAULT_JUSTIFICATION


@bp.post("/keys/<path:ref>/datakey")
@operation("datakey")
def datakey(ref: str) -> dict[str, Any]:
    """``{context?, include_plaintext?=true}`` ->
    ``{key_id, key_version, ciphertext, plaintext?}``"""
    return _single_or_batch(
        {"context", "include_plaintext"},
        frozenset(),
        lambda b: DataKeyRequest(p.context(b), p.boolean(b, "include_plaintext", True)),
        lambda items: services().crypto.datakey(caller(), ref, items),
    )


@bp.post("/keys/<path:ref>/encrypt")
@operation("encrypt")
def encrypt(ref: str) -> dict[str, Any]:
    """``{plaintext, context?}`` -> ``{key_id, key_version, ciphertext}``"""
    return _single_or_batch(
        {"plaintext", "context"},
        frozenset({"plaintext"}),
        lambda b: EncryptRequest(p.b64(b, "plaintext", max_bytes=MAX_PLAINTEXT), p.context(b)),
        lambda items: services().crypto.encrypt(caller(), ref, items),
    )


@bp.post("/decrypt")
@operation("decrypt")
def decrypt() -> dict[str, Any]:
    """``{ciphertext, context?, justification?, reference?, case_id?}`` ->
    ``{key_id, key_version, plaintext}``; ``case_id`` is for requesters with an active
    escrow case."""
    return _single_or_batch(
        {"ciphertext", "context", "justification", "reference", "case_id"},
        frozenset({"ciphertext"}),
        lambda b: DecryptRequest(
            p.b64(b, "ciphertext", max_bytes=MAX_BLOB_BYTES),
            p.context(b),
            _justification(b),
            p.string(b, "reference", max_len=200),
            p.string(b, "case_id", max_len=64),
        ),
        lambda items: services().crypto.decrypt(caller(), items),
    )


@bp.post("/rewrap")
@operation("rewrap")
def rewrap() -> dict[str, Any]:
    """``{ciphertext, context?, destination_key?, justification?, reference?}`` ->
    ``{key_id, key_version, ciphertext}``"""
    return _single_or_batch(
        {"ciphertext", "context", "destination_key", "justification", "reference"},
        frozenset({"ciphertext"}),
        lambda b: RewrapRequest(
            p.b64(b, "ciphertext", max_bytes=MAX_BLOB_BYTES),
            p.context(b),
            p.string(b, "destination_key", max_len=64),
            _justification(b),
            p.string(b, "reference", max_len=200),
        ),
        lambda items: services().crypto.rewrap(caller(), items),
    )
