"""Envelope encryption of bytes, streams and files under a data key from the KMS.

Each envelope gets a fresh 256-bit DEK from ``datakey``; the data is sealed locally,
segment by segment, with AES-256-GCM (byte layout in kms.formats.envelope) and the wrapped
DEK travels in the header. Opening sends only the wrapped DEK to the server (``decrypt``)
and decrypts locally, so memory stays bounded by the segment size whatever the data length.
The encryption context is bound twice: by the server to the wrapped DEK and here, as AAD,
to every segment.

Guarantees:

- Every failure is a KmsClientError: ``invalid_request`` for a bad argument (checked before
  any I/O or server call), ``io_error`` for a failing file or stream, the server's own code
  when it refuses ``datakey`` or ``decrypt``, ``bad_response`` for an unusable data key, and
  ``decryption_failed`` for anything wrong with the envelope itself (malformed header, bad
  tag, truncation, trailing data, reordering, wrong context or DEK). The last is one error
  with one message and no chained cause, so it reveals nothing about which check failed.
- The DEK never appears in an exception, message or repr, and local references to it are
  dropped once the cipher is keyed (best effort: Python cannot wipe memory).
- ``open_stream`` writes each segment once its tag verifies, so after a failure ``dst`` may
  hold a prefix of authentic plaintext that must be discarded. decrypt_bytes and
  decrypt_file do that: they release plaintext only after the final segment verified.
- The ``*_file`` functions write a temporary file (mode 0600) in the destination directory,
  fsync it and rename it over the destination only on success; on failure it is removed and
  the destination is left untouched. Only a crash mid-way can leave a ``.<name>.*.tmp``.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.client.cache import DataKeyCache
from kms.client.http import DataKey, KmsClientError
from kms.formats import context as ctx
from kms.formats import envelope as env

DEK_BYTES = 32
StrPath = str | os.PathLike[str]


class EnvelopeClient(Protocol):
    """What envelope encryption needs from a client; KmsClient provides it."""

    def datakey(self, key: str, context: Mapping[str, str] | None = None) -> DataKey: ...

    def decrypt(self, ciphertext: bytes, context: Mapping[str, str] | None = None) -> bytes: ...


class _Undecryptable(Exception):
    """Internal: the envelope is bad. Never escapes this module."""


def seal_stream(
    dek: bytes,
    wrapped_dek: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    context: Mapping[str, str] | None = None,
    *,
    segment_size: int = env.DEFAULT_SEGMENT_SIZE,
    nonce_prefix: bytes | None = None,
) -> None:
    """Encrypt everything ``src`` yields into ``dst`` as one envelope.

    ``dek`` must be fresh for this envelope, or ``nonce_prefix`` must differ from that of
    every other envelope under the same DEK (DataKeyCache assigns such prefixes; test
    vectors fix one); by default it is 7 random bytes. Arguments are checked before
    anything is written (``invalid_request``). After a failure ``dst`` may hold a partial
    envelope, which will never decrypt.
    """
    if not isinstance(dek, bytes) or len(dek) != DEK_BYTES:
        raise _invalid(f"the DEK must be {DEK_BYTES} bytes")
    values = _context(context)
    if nonce_prefix is None:
        nonce_prefix = os.urandom(env.NONCE_PREFIX_BYTES)
    try:
        header = env.Header(wrapped_dek, nonce_prefix, segment_size)
        aad = header.aad(values)
    except env.EnvelopeError as e:
        raise _invalid(str(e)) from None
    aead = AESGCM(dek)
    del dek
    try:
        _write_all(dst, header.to_bytes())
        _seal_segments(aead, header, aad, src, dst)
    except env.EnvelopeError as e:
        raise _invalid(str(e)) from None
    except OSError as e:
        raise _io_error(e) from None


def open_stream(
    src: BinaryIO,
    dst: BinaryIO,
    context: Mapping[str, str] | None,
    unwrap: Callable[[bytes], bytes],
) -> None:
    """Decrypt one envelope from ``src`` into ``dst``, authenticating every segment.

    Calls ``unwrap(wrapped_dek)`` once to obtain the DEK; a KmsClientError from it
    propagates unchanged, any other exception counts as a bad envelope. Reads ``src`` to its
    end: trailing bytes are an error. Returns only if the whole envelope verified; after a
    failure ``dst`` may hold a prefix of authentic plaintext, which the caller must discard.
    """
    values = _context(context)
    failed = False
    try:
        _open_segments(src, dst, values, unwrap)
    except (_Undecryptable, env.EnvelopeError, InvalidTag):
        failed = True
    except OSError as e:
        raise _io_error(e) from None
    if failed:  # raised outside the handler so no cause or context is attached
        raise KmsClientError("decryption_failed", "the envelope could not be decrypted")


def encrypt_bytes(
    client: EnvelopeClient,
    key: str,
    plaintext: bytes,
    context: Mapping[str, str] | None = None,
    *,
    cache: DataKeyCache | None = None,
) -> bytes:
    """One envelope of ``plaintext`` under a fresh DEK of ``key`` (one ``datakey`` call),
    or under a cached DEK if a ``cache`` is given and has room."""
    if not isinstance(plaintext, bytes):
        raise _invalid("plaintext must be bytes")
    _check_key(key)
    values = _context(context)
    out = io.BytesIO()
    _seal_with(client, key, values, len(plaintext), cache, io.BytesIO(plaintext), out)
    return out.getvalue()


def decrypt_bytes(
    client: EnvelopeClient,
    data: bytes,
    context: Mapping[str, str] | None = None,
    *,
    cache: DataKeyCache | None = None,
) -> bytes:
    """The plaintext of an envelope, returned only if every segment verified."""
    if not isinstance(data, bytes):
        raise _invalid("data must be bytes")
    values = _context(context)
    out = io.BytesIO()
    open_stream(io.BytesIO(data), out, values, _unwrapper(client, values, cache))
    return out.getvalue()


def encrypt_file(
    client: EnvelopeClient,
    key: str,
    src_path: StrPath,
    dst_path: StrPath,
    context: Mapping[str, str] | None = None,
    *,
    cache: DataKeyCache | None = None,
) -> None:
    """Encrypt the file ``src_path`` to ``dst_path``, replaced atomically on success only."""
    _check_key(key)
    values = _context(context)
    try:
        with open(src_path, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            with _atomic_output(dst_path) as dst:
                _seal_with(client, key, values, size, cache, src, dst)
    except OSError as e:
        raise _io_error(e) from None


def decrypt_file(
    client: EnvelopeClient,
    src_path: StrPath,
    dst_path: StrPath,
    context: Mapping[str, str] | None = None,
    *,
    cache: DataKeyCache | None = None,
) -> None:
    """Decrypt the envelope in ``src_path`` to ``dst_path``, which appears (atomically) only
    once the whole envelope verified."""
    values = _context(context)
    try:
        with open(src_path, "rb") as src, _atomic_output(dst_path) as dst:
            open_stream(src, dst, values, _unwrapper(client, values, cache))
    except OSError as e:
        raise _io_error(e) from None


# -- internals ----------------------------------------------------------------------------


def _seal_segments(
    aead: AESGCM, header: env.Header, aad: bytes, src: BinaryIO, dst: BinaryIO
) -> None:
    size = header.segment_size
    index = 0
    chunk = env.read_exact(src, size)
    while True:
        # Read one segment ahead: a full segment is final only if nothing follows it.
        following = env.read_exact(src, size) if len(chunk) == size else b""
        last = not following
        if index > env.MAX_SEGMENT_INDEX:
            raise _invalid("the data is too large for one envelope")
        _write_all(dst, aead.encrypt(header.segment_nonce(index, last), chunk, aad))
        if last:
            return
        chunk, index = following, index + 1


def _open_segments(
    src: BinaryIO, dst: BinaryIO, values: dict[str, str], unwrap: Callable[[bytes], bytes]
) -> None:
    header = env.read_header(src)
    aad = header.aad(values)
    wire = header.segment_wire_size
    chunk = env.read_exact(src, wire)
    if len(chunk) < env.TAG_BYTES:  # no segment at all: fail before asking the server
        raise _Undecryptable
    try:
        dek = unwrap(header.wrapped_dek)
    except KmsClientError:
        raise
    except Exception:
        raise _Undecryptable from None
    if not isinstance(dek, bytes) or len(dek) != DEK_BYTES:
        raise _Undecryptable
    aead = AESGCM(dek)
    del dek
    index = 0
    while True:
        following = env.read_exact(src, wire) if len(chunk) == wire else b""
        last = not following
        if len(chunk) < env.TAG_BYTES or index > env.MAX_SEGMENT_INDEX:
            raise _Undecryptable
        if last and index > 0 and len(chunk) == env.TAG_BYTES:
            raise _Undecryptable  # only segment 0 may be an empty final segment
        _write_all(dst, aead.decrypt(header.segment_nonce(index, last), chunk, aad))
        if last:
            return
        chunk, index = following, index + 1


def _seal_with(
    client: EnvelopeClient,
    key: str,
    values: dict[str, str],
    size: int,
    cache: DataKeyCache | None,
    src: BinaryIO,
    dst: BinaryIO,
) -> None:
    """Seal under a fresh data key, or a cached one with the nonce prefix the cache
    assigns (unique per envelope under that key)."""
    if cache is None:
        datakey, prefix = client.datakey(key, values), None
    else:
        datakey, prefix = cache.for_sealing(key, values, size, lambda: client.datakey(key, values))
    dek, wrapped = datakey.plaintext, datakey.ciphertext
    if not isinstance(dek, bytes) or len(dek) != DEK_BYTES:
        raise KmsClientError("bad_response", "the server returned an unusable data key")
    if not isinstance(wrapped, bytes) or not 1 <= len(wrapped) <= env.MAX_WRAPPED_DEK_BYTES:
        raise KmsClientError("bad_response", "the server returned an unusable wrapped key")
    seal_stream(dek, wrapped, src, dst, values, nonce_prefix=prefix)


def _unwrapper(
    client: EnvelopeClient, values: dict[str, str], cache: DataKeyCache | None
) -> Callable[[bytes], bytes]:
    if cache is None:
        return lambda wrapped: client.decrypt(wrapped, values)
    return lambda wrapped: cache.for_opening(wrapped, values, lambda w: client.decrypt(w, values))


@contextlib.contextmanager
def _atomic_output(dst_path: StrPath) -> Iterator[BinaryIO]:
    """A 0600 temporary file beside ``dst_path``, renamed over it if the body succeeds and
    removed otherwise."""
    target = os.path.abspath(os.fspath(dst_path))
    directory, name = os.path.split(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(dst: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = dst.write(view)
        if written is None or written <= 0:  # non-blocking raw stream
            raise OSError("the output stream accepted no data")
        view = view[written:]


def _context(context: object) -> dict[str, str]:
    try:
        return ctx.validate(context)
    except ctx.ContextError as e:
        raise _invalid(str(e)) from None


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        raise _invalid("key must be a non-empty string")


def _invalid(message: str) -> KmsClientError:
    return KmsClientError("invalid_request", message)


def _io_error(e: OSError) -> KmsClientError:
    where = f": {e.filename}" if e.filename else ""
    return KmsClientError("io_error", f"{e.strerror or e}{where}")
