"""The sealed state: which rows that grant or describe access exist, with their seals.

An entry is ``(kind, ident, seal)``: ``kind`` a row kind of kms/services/seals.py,
``ident`` the canonical JSON array of the row's key columns (``["k-1",2]`` for version 2
of key k-1), ``seal`` the row's 64-hex seal, or ``"-"`` for a row stored without one.

Two digests of a set of entries:

- the **anchored digest** (kms/services/state_index.py): the sum modulo 2^256 of
  HMAC-SHA256(salt, ``kind \\n ident \\n seal``) over the entries (a row present twice
  counts twice), with a salt that only the HSM can give (so whoever reads the database
  cannot find another set with the same digest). It moves in O(1) per changed row and
  is kept in the HSM token, as a private data object whose value is::

      b"KMS-STATE-1\\n" || canonical JSON {"digest": "<64 hex>", "n": <int >= 0>}

  ``n`` counts the transactions that changed a sealed row (the state_changes log).

- the **public digest**, for auditors: SHA-256 over the sorted lines
  ``kind \\t ident \\t seal \\n`` (UTF-8). A signed checkpoint carries it with ``n``
  (kms/formats/checkpoint.py), and ``kms audit export-state`` writes the entries
  themselves, so that the offline verifier recomputes it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = b"KMS-STATE-1\n"
MODULUS = 1 << 256
NO_SEAL = "-"
_HEX64 = re.compile(r"[0-9a-f]{64}")

Entry = tuple[str, str, str]


class StateFormatError(ValueError):
    """The bytes are not a state anchor of a known version."""


def ident(values: Iterable[object]) -> str:
    """The ident of a row from its key columns' values (str or int)."""
    return json.dumps(list(values), separators=(",", ":"), ensure_ascii=True)


def element(salt: bytes, kind: str, row: str, seal: str) -> int:
    """The anchored digest's term of one entry."""
    message = f"{kind}\n{row}\n{seal}".encode()
    return int.from_bytes(hmac.digest(salt, message, "sha256"), "big")


def anchored_digest(salt: bytes, entries: Iterable[Entry]) -> int:
    return sum(element(salt, kind, row, seal) for kind, row, seal in entries) % MODULUS


def public_digest(entries: Iterable[Entry]) -> str:
    """Hex SHA-256 of the sorted entry lines (see the module docstring)."""
    h = hashlib.sha256()
    for kind, row, seal in sorted(entries):
        h.update(f"{kind}\t{row}\t{seal}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True, order=True)
class StateAnchor:
    n: int
    digest: int

    def encode(self) -> bytes:
        body = json.dumps({"digest": f"{self.digest:064x}", "n": self.n}, sort_keys=True)
        return PREFIX + body.replace(" ", "").encode("ascii")


def decode(data: bytes) -> StateAnchor:
    """The state anchor in ``data``; StateFormatError unless exactly version 1."""
    if not data.startswith(PREFIX):
        raise StateFormatError("not a KMS-STATE-1 value")
    try:
        fields = json.loads(data[len(PREFIX) :])
    except (UnicodeDecodeError, ValueError) as e:
        raise StateFormatError("state anchor body is not JSON") from e
    if not isinstance(fields, dict) or set(fields) != {"digest", "n"}:
        raise StateFormatError("state anchor body must hold exactly digest and n")
    n, digest = fields["n"], fields["digest"]
    if type(n) is not int or n < 0 or not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise StateFormatError("state anchor n or digest malformed")
    anchor = StateAnchor(n, int(digest, 16))
    if anchor.encode() != data:
        raise StateFormatError("state anchor is not in canonical form")
    return anchor
