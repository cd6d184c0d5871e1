"""How a request names a key: by its key id (a UUID the service chose) or by its alias.

The two spaces never overlap: an alias may not look like a key id, so a reference is read
as a key id exactly when it has the UUID's shape, and an alias can never shadow a key.
"""

from __future__ import annotations

import re

from kms.errors import InvalidRequest, NotFound
from kms.services.model import Key
from kms.services.ports import KeyRows

ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9/_.-]{0,63}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def resolve(tx: KeyRows, ref: str) -> Key:
    """The key named by a key id or an alias; NotFound otherwise."""
    key = tx.key_by_id(ref) if UUID_RE.fullmatch(ref) else tx.key_by_alias(ref)
    if key is None:
        raise NotFound("no such key")
    return key


def check_alias(alias: str) -> None:
    """InvalidRequest unless ``alias`` is a well-formed alias that cannot be read as a key
    id."""
    if not ALIAS_RE.fullmatch(alias) or UUID_RE.fullmatch(alias):
        raise InvalidRequest(
            "alias must be 1-64 characters of letters, digits, '/', '_', '.', '-' "
            "and must not look like a key id"
        )
