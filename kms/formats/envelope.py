"""The envelope: data of any length encrypted locally under a DEK that the KMS wrapped.

Byte layout of format version 1, all integers unsigned big-endian. The header::

    offset  size  field
    0       4     magic b"KMSE"
    4       1     format version = 1
    5       4     segment size S: plaintext bytes per segment (4096..16 MiB)
    9       2     wrapped-DEK length W (1..8192)
    11      W     wrapped DEK: the server's blob, opaque here
    11+W    7     nonce prefix P (random, fresh per envelope)

The header is ``18 + W`` bytes. Segments follow it, back to back, without length prefixes::

    segment i = AES-256-GCM(DEK, nonce_i, plaintext_i, aad) = ciphertext_i || tag (16)
    nonce_i   = P (7) || u32 i (4) || u8 last (1)      last = 1 for the final segment, else 0
    aad       = header bytes (0 .. 18+W) || canonical context (kms.formats.context.encode)

Every segment but the final one holds exactly S plaintext bytes (S + 16 on the wire). The
final segment holds 1..S plaintext bytes, except when it is segment 0: an empty plaintext
is one final segment of 0 bytes (the 16-byte tag alone). So each plaintext has exactly one
segmentation, and a reader knows segment i is final when fewer than S + 16 bytes remain
after it or nothing does. At most 2^32 segments (i <= 2^32 - 1).

Binding the index and the final flag into the nonce (the STREAM construction, as in Tink's
streaming AEAD) makes reordering, dropping segments, truncation at a segment boundary and
appended data all fail authentication; binding the header into the AAD makes every header
byte authenticated. A nonce never repeats under one DEK because each envelope gets a fresh
DEK and prefix and each segment a distinct (index, flag) pair.

This module is the pure format: it parses and builds headers and nonces and never
encrypts. Every length is checked before use; any malformation raises EnvelopeError.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from kms.formats import context as ctx

MAGIC = b"KMSE"
FORMAT_VERSION = 1
NONCE_PREFIX_BYTES = 7
TAG_BYTES = 16
MIN_SEGMENT_SIZE = 4096
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
DEFAULT_SEGMENT_SIZE = 65536
MAX_WRAPPED_DEK_BYTES = 8192
MAX_SEGMENT_INDEX = 0xFFFFFFFF
# magic, version, segment size, wrapped-DEK length: the part read before W is known.
_FIXED = struct.Struct(">4sBIH")


class EnvelopeError(ValueError):
    """The bytes are not a well-formed envelope header of a known version, or a value does
    not fit the format."""


@dataclass(frozen=True)
class Header:
    """A validated envelope header. Holds no secret: the DEK inside is wrapped.

    Construction raises EnvelopeError unless every field fits the layout, so a Header
    always serialises to a header that ``read_header`` accepts.
    """

    wrapped_dek: bytes
    nonce_prefix: bytes
    segment_size: int = DEFAULT_SEGMENT_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.wrapped_dek, bytes):
            raise EnvelopeError("wrapped DEK must be bytes")
        if not 1 <= len(self.wrapped_dek) <= MAX_WRAPPED_DEK_BYTES:
            raise EnvelopeError(f"wrapped DEK must be 1..{MAX_WRAPPED_DEK_BYTES} bytes")
        if not isinstance(self.nonce_prefix, bytes) or len(self.nonce_prefix) != NONCE_PREFIX_BYTES:
            raise EnvelopeError(f"nonce prefix must be {NONCE_PREFIX_BYTES} bytes")
        size = self.segment_size
        if not isinstance(size, int) or isinstance(size, bool):
            raise EnvelopeError("segment size must be an integer")
        if not MIN_SEGMENT_SIZE <= size <= MAX_SEGMENT_SIZE:
            raise EnvelopeError(f"segment size must be {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}")

    @property
    def size(self) -> int:
        """Length of the serialised header in bytes (18 + W)."""
        return _FIXED.size + len(self.wrapped_dek) + NONCE_PREFIX_BYTES

    @property
    def segment_wire_size(self) -> int:
        """Bytes on the wire of every non-final segment (S + 16)."""
        return self.segment_size + TAG_BYTES

    def to_bytes(self) -> bytes:
        """The exact header bytes (offsets 0 .. 18+W of the envelope)."""
        fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, self.segment_size, len(self.wrapped_dek))
        return fixed + self.wrapped_dek + self.nonce_prefix

    def segment_nonce(self, index: int, last: bool) -> bytes:
        """The 12-byte AES-GCM nonce of segment ``index``; distinct for each (index, last)."""
        if not 0 <= index <= MAX_SEGMENT_INDEX:
            raise EnvelopeError("segment index out of range")
        return self.nonce_prefix + struct.pack(">IB", index, 1 if last else 0)

    def aad(self, context: Mapping[str, str] | None) -> bytes:
        """The AAD of every segment: header bytes followed by the canonical context.

        Raises EnvelopeError if ``context`` is not a valid encryption context.
        """
        try:
            encoded = ctx.encode(ctx.validate(context))
        except ctx.ContextError as e:
            raise EnvelopeError(f"invalid context: {e}") from None
        return self.to_bytes() + encoded


def read_exact(stream: BinaryIO, n: int) -> bytes:
    """Read ``n`` bytes, or fewer only if the stream ends first; never more.

    Loops over short reads. Raises EnvelopeError if the stream does not yield bytes (text
    mode, or a non-blocking stream with no data ready).
    """
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = stream.read(n - got)
        if not isinstance(chunk, bytes | bytearray):
            raise EnvelopeError("stream must be a blocking binary stream")
        if not chunk:
            break
        if len(chunk) > n - got:
            raise EnvelopeError("stream returned more bytes than requested")
        parts.append(bytes(chunk))
        got += len(chunk)
    return b"".join(parts)


def read_header(stream: BinaryIO) -> Header:
    """Read exactly one header from ``stream`` and leave it positioned at segment 0.

    Raises EnvelopeError on bad magic or version, out-of-range sizes or truncation. Only
    the layout is checked here; authenticity is established by the segment tags.
    """
    fixed = read_exact(stream, _FIXED.size)
    if len(fixed) < _FIXED.size:
        raise EnvelopeError("envelope truncated")
    magic, version, segment_size, wrapped_len = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise EnvelopeError("not an envelope")
    if version != FORMAT_VERSION:
        raise EnvelopeError("unknown envelope format version")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise EnvelopeError("segment size out of range")
    if not 1 <= wrapped_len <= MAX_WRAPPED_DEK_BYTES:
        raise EnvelopeError("wrapped DEK length out of range")
    rest = read_exact(stream, wrapped_len + NONCE_PREFIX_BYTES)
    if len(rest) < wrapped_len + NONCE_PREFIX_BYTES:
        raise EnvelopeError("envelope truncated")
    return Header(rest[:wrapped_len], rest[wrapped_len:], segment_size)
