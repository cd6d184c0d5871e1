"""Canonical encoding of an encryption context.

An encryption context is a small map of UTF-8 strings that is bound to a ciphertext as
additional authenticated data (AAD): decrypting needs the same map.

Byte layout (version 1), all integers unsigned big-endian::

    u16  number of pairs N (0..64)
    N times, pairs sorted by the UTF-8 bytes of the key:
        u16  key length    k (1..256)     key bytes (UTF-8)
        u16  value length  v (0..1024)    value bytes (UTF-8)

Length prefixes make the encoding injective: ``{"ab": "c"}`` and ``{"a": "bc"}`` encode
differently, and no two distinct maps share an encoding. The empty context encodes as
``b"\\x00\\x00"``.

Keyed context hash (what audit records carry in ``context_sha256``): the hex
HMAC-SHA256, computed inside the HSM with its integrity key, of::

    b"KMS-CONTEXT-1\\n" || canonical encoding

The prefix separates it from every other use of that key (row seals start with
``b"KMS-ROW-1\\n"``, the dashboard's session key is the MAC of a fixed label), so a
context hash can never be replayed as a seal or a session key. Equal contexts give equal
hashes; without the HSM nobody can compute one, so a guessable context (``{"patient":
"p-1"}``) cannot be found by hashing candidates. ``digest`` (unkeyed SHA-256) is what
records written before keyed hashes carry, and what local tools use as an identifier.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

MAX_PAIRS = 64
MAX_KEY_BYTES = 256
MAX_VALUE_BYTES = 1024
KEYED_PREFIX = b"KMS-CONTEXT-1\n"


class ContextError(ValueError):
    """The context is not a map of bounded strings."""


def validate(context: object) -> dict[str, str]:
    """Return ``context`` as a plain dict if it is a valid encryption context.

    Raises ContextError naming the first problem found; never returns a partial result.
    """
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise ContextError("context must be an object of string values")
    if len(context) > MAX_PAIRS:
        raise ContextError(f"context has more than {MAX_PAIRS} entries")
    out: dict[str, str] = {}
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ContextError("context keys and values must be strings")
        try:
            kb, vb = key.encode("utf-8"), value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ContextError("context strings must be valid UTF-8") from e
        if not 1 <= len(kb) <= MAX_KEY_BYTES:
            raise ContextError(f"context keys must be 1..{MAX_KEY_BYTES} bytes")
        if len(vb) > MAX_VALUE_BYTES:
            raise ContextError(f"context values must be at most {MAX_VALUE_BYTES} bytes")
        out[key] = value
    return out


def encode(context: Mapping[str, str]) -> bytes:
    """Canonical bytes of a validated context (see module docstring for the layout)."""
    pairs = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    parts = [struct.pack(">H", len(pairs))]
    for kb, vb in pairs:
        parts.append(struct.pack(">H", len(kb)) + kb + struct.pack(">H", len(vb)) + vb)
    return b"".join(parts)


def keyed_input(context: Mapping[str, str]) -> bytes:
    """The bytes the HSM MACs for a keyed context hash (see the module docstring)."""
    return KEYED_PREFIX + encode(context)


def digest(context: Mapping[str, str]) -> str:
    """Hex SHA-256 of the canonical encoding, unkeyed: anyone can recompute it, so it
    reveals a guessable context. Audit records written before keyed context hashes hold
    it; new records hold the keyed hash (kms/services/context_hash.py)."""
    return hashlib.sha256(encode(context)).hexdigest()
