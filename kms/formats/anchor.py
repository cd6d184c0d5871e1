"""The audit anchor: the last chain head the signer vouched for, kept in the HSM token
as the value of a private data object (kms/services/audit_anchor.py), so that whoever
writes the database cannot move it.

Byte layout (version 1)::

    b"KMS-ANCHOR-1\\n" || canonical JSON
        {"archived": <int >= 0>, "hash": "<64 hex>", "seq": <int >= 0>}

canonical JSON: keys sorted, no whitespace, ASCII. ``seq`` and ``hash`` are the newest
head the signer vouched for (``seq`` 0 with the genesis hash, 64 zeros, anchors an empty
chain); ``archived`` the seq up to which records were archived (removed from the
database) by ``kms audit archive``, so that deleting signed history and calling it an
archive is noticed. ``archived <= seq``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

PREFIX = b"KMS-ANCHOR-1\n"
_HASH = re.compile(r"[0-9a-f]{64}")


class AnchorError(ValueError):
    """The bytes are not an anchor of a known version."""


@dataclass(frozen=True, order=True)
class Anchor:
    seq: int
    hash: str
    archived: int = 0

    def encode(self) -> bytes:
        fields = {"archived": self.archived, "hash": self.hash, "seq": self.seq}
        body = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return PREFIX + body.encode("ascii")


def decode(data: bytes) -> Anchor:
    """The anchor in ``data``; AnchorError if it is not exactly a version-1 anchor."""
    if not data.startswith(PREFIX):
        raise AnchorError("not a KMS-ANCHOR-1 value")
    try:
        fields = json.loads(data[len(PREFIX) :])
    except (UnicodeDecodeError, ValueError) as e:
        raise AnchorError("anchor body is not JSON") from e
    if not isinstance(fields, dict) or set(fields) != {"archived", "hash", "seq"}:
        raise AnchorError("anchor body must hold exactly archived, hash and seq")
    seq, hash_, archived = fields["seq"], fields["hash"], fields["archived"]
    if type(seq) is not int or seq < 0 or not isinstance(hash_, str) or not _HASH.fullmatch(hash_):
        raise AnchorError("anchor seq or hash malformed")
    if type(archived) is not int or not 0 <= archived <= seq:
        raise AnchorError("anchor archived malformed")
    anchor = Anchor(seq, hash_, archived)
    if anchor.encode() != data:
        raise AnchorError("anchor is not in canonical form")
    return anchor
