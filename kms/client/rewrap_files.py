"""Bulk rewrap of files in place: raw blob files and SDK envelope files.

A raw blob file (magic ``KMSW``) is replaced by its rewrapped blob. An envelope file
(``KMSE``, made by encrypt_file) binds its header, wrapped DEK included, into every
segment's AAD, so changing the wrapped DEK means re-sealing the segments: the DEK is
rewrapped, the *new* wrapped DEK is decrypted (so the file is re-sealed under exactly the
DEK its new header names), the old envelope is authenticated segment by segment and
re-sealed with a fresh nonce prefix into a temporary file that replaces the original only
on success. This needs the
``rewrap`` and ``decrypt`` grants; the DEK exists on the client only during the re-seal,
as it does for any decrypt.

Per-file failures are failed results as in kms.client.rewrap; a failure of a whole
request raises KmsClientError before any file of the call is replaced.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.client.envelope import DEK_BYTES, _atomic_output, open_stream
from kms.client.http import KmsClientError
from kms.client.rewrap import (
    BulkRewrapper,
    Census,
    InputError,
    RewrapItem,
    RewrapResult,
    _b64,
    _failed,
    _local_error,
    _unb64,
    batch_call,
)
from kms.formats import blob as blobfmt
from kms.formats import envelope as env


def census_files(root: Path, names: Iterable[str]) -> Census:
    """Count the blob of each file (raw blob or envelope header) under ``root``."""
    out = Census()
    for name in names:
        try:
            parsed = blobfmt.parse(read_stored_blob(root / name)[1])
        except (InputError, blobfmt.BlobError, OSError) as e:
            out.count(None, None, name, str(e))
        else:
            out.count(parsed.key_id, parsed.key_version, name)
    return out


def list_files(root: Path, pattern: str = "*", exclude_suffix: str | None = None) -> list[str]:
    """Relative POSIX paths of the regular files under ``root`` matching ``pattern``
    (recursively), sorted; hidden files and directories, symlinks and names ending in
    ``exclude_suffix`` are left out."""
    names = []
    for path in root.rglob(pattern):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.is_symlink():
            continue
        if not path.is_file() or (exclude_suffix and path.name.endswith(exclude_suffix)):
            continue
        names.append(rel.as_posix())
    return sorted(names)


def read_stored_blob(path: Path) -> tuple[Literal["blob", "envelope"], bytes]:
    """The blob a file holds: the whole of a raw blob file, or an envelope's wrapped DEK."""
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic == blobfmt.MAGIC:
            data = magic + f.read(blobfmt.MAX_BLOB_BYTES)
            return "blob", data
        if magic == env.MAGIC:
            f.seek(0)
            try:
                return "envelope", env.read_header(f).wrapped_dek
            except env.EnvelopeError as e:
                raise InputError(f"bad envelope header: {e}") from None
    raise InputError("not a KMS blob or envelope file")


def rewrap_files(
    bulk: BulkRewrapper, files: Sequence[tuple[Path, Mapping[str, str]]]
) -> list[RewrapResult]:
    """Rewrap each file in place (see the module docstring); one result per file. A file
    is replaced atomically, keeping its permission bits, only once its new content is
    complete and the old envelope authenticated; after a failure it is untouched. Raises
    KmsClientError if a whole request failed, before any file of the call is replaced."""
    kinds: list[str] = []
    items: list[RewrapItem] = []
    results: list[RewrapResult | None] = [None] * len(files)
    for i, (path, context) in enumerate(files):
        kind: str
        try:
            kind, data = read_stored_blob(path)
        except (InputError, OSError) as e:
            results[i] = _failed(_local_error(e))
            kind, data = "", b""
        kinds.append(kind)
        items.append(RewrapItem(data, context))
    todo = [i for i, r in enumerate(results) if r is None]
    for i, result in zip(todo, bulk.rewrap([items[i] for i in todo]), strict=True):
        results[i] = result
    done = [i for i in todo if _new(results[i]) is not None]
    sealed = [i for i in done if kinds[i] == "envelope"]
    bodies: list[dict[str, Any]] = [
        {"ciphertext": _b64(_new(results[i]) or b""), "context": dict(files[i][1])} for i in sealed
    ]
    if bulk.reference:
        bodies = [{**body, "reference": bulk.reference} for body in bodies]
    deks = dict(
        zip(sealed, batch_call(bulk.client, "/v1/decrypt", bodies) if bodies else [], strict=True)
    )
    for i in done:
        new = _new(results[i])
        assert new is not None
        try:
            if kinds[i] == "blob":
                _replace_blob(files[i][0], items[i].ciphertext, new)
            else:
                _reseal(files[i], items[i].ciphertext, new, deks[i])
        except (KmsClientError, InputError, OSError, env.EnvelopeError) as e:
            results[i] = _failed(_local_error(e), blobfmt.parse(items[i].ciphertext))
    return [r for r in results if r is not None]


def _new(result: RewrapResult | None) -> bytes | None:
    return result.ciphertext if result is not None and result.status == "rewrapped" else None


def _replace_blob(path: Path, old: bytes, new: bytes) -> None:
    if read_stored_blob(path) != ("blob", old):
        raise InputError("the file changed during the rewrap")
    with _atomic_output(path) as out:
        os.fchmod(out.fileno(), os.stat(path).st_mode & 0o7777)
        out.write(new)


def _reseal(
    file: tuple[Path, Mapping[str, str]],
    old: bytes,
    new: bytes,
    answer: dict[str, Any] | KmsClientError,
) -> None:
    """Re-seal the envelope at ``file`` under a header naming ``new``, with the DEK the
    server returned for ``new`` in ``answer`` (decrypt), after authenticating every old
    segment with that DEK."""
    if isinstance(answer, KmsClientError):
        raise answer
    path, context = file
    try:
        dek = _unb64(answer["plaintext"])
    except (KeyError, TypeError, ValueError):
        raise KmsClientError("bad_response", "unusable decrypt result") from None
    if len(dek) != DEK_BYTES:
        raise KmsClientError("bad_response", "unusable decrypt result")
    with open(path, "rb") as src:
        header = env.read_header(src)
        if header.wrapped_dek != old:
            raise InputError("the file changed during the rewrap")
        src.seek(0)
        prefix = os.urandom(env.NONCE_PREFIX_BYTES)
        while prefix[:3] == header.nonce_prefix[:3]:  # never in the old DataKeyCache family
            prefix = os.urandom(env.NONCE_PREFIX_BYTES)
        fresh = env.Header(new, prefix, header.segment_size)
        with _atomic_output(path) as dst:
            os.fchmod(dst.fileno(), os.fstat(src.fileno()).st_mode & 0o7777)
            dst.write(fresh.to_bytes())
            writer = _SealingWriter(AESGCM(dek), fresh, fresh.aad(context), dst)
            open_stream(src, cast(BinaryIO, writer), context, lambda _wrapped: dek)
            writer.finish()


class _SealingWriter:
    """A write-only stream that seals what it receives as the segments of ``header``;
    ``finish`` writes the final segment. Holds at most two segments of plaintext."""

    def __init__(self, aead: AESGCM, header: env.Header, aad: bytes, dst: BinaryIO) -> None:
        self._aead, self._header, self._aad, self._dst = aead, header, aad, dst
        self._buf = bytearray()
        self._index = 0

    def write(self, data: bytes | memoryview) -> int:
        self._buf += data
        size = self._header.segment_size
        while len(self._buf) > size:  # more follows, so this segment is not the last
            self._emit(bytes(self._buf[:size]), last=False)
            del self._buf[:size]
        return len(data)

    def finish(self) -> None:
        self._emit(bytes(self._buf), last=True)
        self._buf.clear()

    def _emit(self, chunk: bytes, last: bool) -> None:
        nonce = self._header.segment_nonce(self._index, last)
        self._dst.write(self._aead.encrypt(nonce, chunk, self._aad))
        self._index += 1
