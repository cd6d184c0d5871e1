"""Bearer tokens: how they are made, stored (only their SHA-256) and named (a token id is
the first 16 hex digits of that hash), for kms/services/principals.py."""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime

from kms.errors import InvalidRequest, NotFound
from kms.services.model import Principal, Token
from kms.services.ports import PrincipalRows

TOKEN_ID_RE = re.compile(r"[0-9a-f]{16}")
TOKEN_PREFIX = "kms_"  # noqa: S105 (a prefix, not a secret)
MAX_TOKEN_CHARS = 128
MAX_GRACE_SECONDS = 30 * 86400  # the longest an old token lives on after a rotation
MAX_TTL_SECONDS = 10 * 365 * 86400


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def hash_of(tx: PrincipalRows, principal: Principal, token_id: str) -> str:
    """The full hash of the principal's token ``token_id``, read from the key column
    alone (a row whose other columns were made unreadable is still found)."""
    for digest in tx.token_hashes(principal.id):
        if digest[:16] == token_id:
            return digest
    raise NotFound(f"principal {principal.name!r} has no token {token_id}")


def token_of(tx: PrincipalRows, principal: Principal, token_id: str) -> tuple[str, Token]:
    for digest, found in tx.tokens_of(principal.id):
        if found.token_id == token_id:
            return digest, found
    raise NotFound(f"principal {principal.name!r} has no token {token_id}")


def check_token_id(token_id: str) -> None:
    if not TOKEN_ID_RE.fullmatch(token_id):
        raise InvalidRequest("a token id is 16 lowercase hex digits")


def expiry_note(expires: datetime | None) -> str:
    return "" if expires is None else f" expires={expires.isoformat()}"
