"""The wrapped-data blob: a value encrypted by a KEK version inside the HSM.

It carries a wrapped DEK (``datakey``) or a small plaintext (``encrypt``); the format does
not distinguish them. Byte layout of format version 1 (integers unsigned big-endian)::

    offset  size  field
    0       4     magic b"KMSW"
    4       1     format version = 1
    5       1     key id length L (1..64), key id is ASCII
    6       L     key id
    6+L     4     key version (1..2^32-1)
    10+L    12    AES-GCM IV (random)
    22+L    n     AES-256-GCM ciphertext followed by the 16-byte tag (n >= 16)

The AES-GCM additional authenticated data is ``header || canonical context`` where
``header`` is bytes ``0 .. 10+L`` (magic, format version, key id, key version), so a blob
cannot be moved to another key, version or context without failing authentication.
Every length is checked before slicing; any malformation raises BlobError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kms.formats import context as ctx

MAGIC = b"KMSW"
FORMAT_VERSION = 1
IV_BYTES = 12
TAG_BYTES = 16
MAX_KEY_ID_BYTES = 64
# Largest payload: 4096-byte plaintext (encrypt) + tag.
MAX_CIPHERTEXT_BYTES = 4096 + TAG_BYTES
MAX_BLOB_BYTES = 6 + MAX_KEY_ID_BYTES + 4 + IV_BYTES + MAX_CIPHERTEXT_BYTES


class BlobError(ValueError):
    """The bytes are not a well-formed blob of a known version."""


@dataclass(frozen=True)
class Blob:
    """A parsed blob. ``ciphertext`` includes the GCM tag."""

    key_id: str
    key_version: int
    iv: bytes
    ciphertext: bytes

    def header(self) -> bytes:
        """The authenticated header (magic .. key version)."""
        kid = self.key_id.encode("ascii")
        return MAGIC + bytes([FORMAT_VERSION, len(kid)]) + kid + struct.pack(">I", self.key_version)

    def aad(self, context: dict[str, str]) -> bytes:
        """The AES-GCM additional authenticated data for this blob and context."""
        return self.header() + ctx.encode(context)

    def to_bytes(self) -> bytes:
        return self.header() + self.iv + self.ciphertext


def header_for(key_id: str, key_version: int, iv: bytes) -> Blob:
    """A blob skeleton (no ciphertext yet) used to compute the AAD before encrypting."""
    _check_key_id(key_id)
    if not 1 <= key_version <= 0xFFFFFFFF:
        raise BlobError("key version out of range")
    if len(iv) != IV_BYTES:
        raise BlobError("IV must be 12 bytes")
    return Blob(key_id, key_version, iv, b"")


def parse(data: bytes) -> Blob:
    """Parse a blob, checking every length and field before use."""
    if len(data) > MAX_BLOB_BYTES:
        raise BlobError("blob too large")
    if len(data) < 6 or data[:4] != MAGIC:
        raise BlobError("not a KMS blob")
    if data[4] != FORMAT_VERSION:
        raise BlobError("unknown blob format version")
    kid_len = data[5]
    if not 1 <= kid_len <= MAX_KEY_ID_BYTES:
        raise BlobError("bad key id length")
    body = 6 + kid_len
    if len(data) < body + 4 + IV_BYTES + TAG_BYTES:
        raise BlobError("blob truncated")
    try:
        key_id = data[6:body].decode("ascii")
    except UnicodeDecodeError as e:
        raise BlobError("key id is not ASCII") from e
    _check_key_id(key_id)
    (version,) = struct.unpack(">I", data[body : body + 4])
    if version == 0:
        raise BlobError("key version out of range")
    iv = data[body + 4 : body + 4 + IV_BYTES]
    return Blob(key_id, version, iv, data[body + 4 + IV_BYTES :])


def _check_key_id(key_id: str) -> None:
    if not 1 <= len(key_id) <= MAX_KEY_ID_BYTES or not key_id.isascii() or not key_id.isprintable():
        raise BlobError("bad key id")
