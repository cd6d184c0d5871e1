"""Bulk rewrap: move many stored wrapped DEKs to the current version of their key.

After a key is rotated, the blobs a service stores still name the old version (the blob
header carries key id and version in clear, kms.formats.blob). ``BulkRewrapper`` sends
them to ``POST /v1/rewrap`` in batches (100 per call by default) and returns one result
per item, in order; the DEK inside never leaves the server. ``Census`` counts blobs per
key and version locally, without the server.

Inputs:

- **JSON Lines** (``parse_jsonl_line``): each line a JSON object with the base64 blob
  under ``field`` and the encryption context (an object of strings; absent or null means
  ``{}``) under ``context_field``. ``JsonlRecord.with_ciphertext`` replaces only the
  text of that one value, so every other byte of the line is kept as it was.
- **Files**: see kms.client.rewrap_files.

Errors: a problem with one item (unreadable input, or a per-item refusal by the server
such as ``decryption_failed``, ``forbidden`` or ``key_version_retired``) is a failed
result and the run goes on. A failure of a whole request (transport error, 5xx, bad
credentials, rate limit) raises KmsClientError: nothing of that call was applied
locally, and the caller can simply retry the same items later.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kms.client.envelope import _atomic_output
from kms.client.http import KmsClient, KmsClientError
from kms.formats import blob as blobfmt
from kms.formats import context as ctx

BATCH_SIZE = 100
MAX_BATCH = 1000  # the server's limit per call
Status = Literal["rewrapped", "current", "failed"]
StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class RewrapItem:
    """One stored blob and the encryption context it was made with."""

    ciphertext: bytes
    context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RewrapResult:
    """``rewrapped``: ``ciphertext`` is the new blob. ``current``: the blob is already at
    the newest version this run has seen for its key, left as is. ``failed``: ``error``
    says why, the stored blob is unchanged. ``key_id``/``key_version`` describe the blob
    now stored (None if it is unreadable)."""

    status: Status
    key_id: str | None
    key_version: int | None
    ciphertext: bytes | None = None
    error: KmsClientError | None = None


class InputError(ValueError):
    """One input record is unusable; the message names the problem (never a secret)."""


class BulkRewrapper:
    """Rewraps items through the batch endpoint; remembers the newest version each key's
    answers showed, so blobs already at it are not sent again during this run."""

    def __init__(
        self, client: KmsClient, *, batch_size: int = BATCH_SIZE, reference: str | None = None
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise KmsClientError("invalid_config", f"batch_size must be 1..{MAX_BATCH}")
        self._client = client
        self._batch_size = batch_size
        self._reference = reference
        self.known_current: dict[str, int] = {}

    @property
    def client(self) -> KmsClient:
        return self._client

    @property
    def reference(self) -> str | None:
        """Sent with every rewrap and decrypt this helper makes (shown in the audit)."""
        return self._reference

    def rewrap(self, items: Sequence[RewrapItem]) -> list[RewrapResult]:
        """One result per item, in order. Raises KmsClientError only if a whole request
        failed; then no result of this call is returned."""
        results: list[RewrapResult | None] = [None] * len(items)
        pending: list[tuple[int, blobfmt.Blob, dict[str, Any]]] = []
        for i, item in enumerate(items):
            try:
                parsed = blobfmt.parse(item.ciphertext)
                context = ctx.validate(item.context)
            except (blobfmt.BlobError, ctx.ContextError) as e:
                code = "malformed_blob" if isinstance(e, blobfmt.BlobError) else "invalid_context"
                results[i] = _failed(KmsClientError(code, str(e)))
                continue
            if parsed.key_version >= self.known_current.get(parsed.key_id, 1 << 32):
                results[i] = RewrapResult("current", parsed.key_id, parsed.key_version)
                continue
            body: dict[str, Any] = {"ciphertext": _b64(item.ciphertext), "context": context}
            if self._reference:
                body["reference"] = self._reference
            pending.append((i, parsed, body))
        for start in range(0, len(pending), self._batch_size):
            chunk = pending[start : start + self._batch_size]
            answers = batch_call(self._client, "/v1/rewrap", [body for _, _, body in chunk])
            for (i, parsed, _), answer in zip(chunk, answers, strict=True):
                results[i] = self._result(parsed, answer)
        return [r for r in results if r is not None]

    def _result(self, old: blobfmt.Blob, answer: dict[str, Any] | KmsClientError) -> RewrapResult:
        if isinstance(answer, KmsClientError):
            return _failed(answer, old)
        try:
            new = blobfmt.parse(_unb64(answer["ciphertext"]))
        except (KeyError, TypeError, ValueError):
            return _failed(KmsClientError("bad_response", "unusable rewrap result"), old)
        seen = self.known_current.get(new.key_id, 0)
        self.known_current[new.key_id] = max(seen, new.key_version)
        return RewrapResult("rewrapped", new.key_id, new.key_version, new.to_bytes())


def batch_call(
    client: KmsClient, path: str, bodies: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any] | KmsClientError]:
    """``POST path {"items": bodies}``: each answer, or the per-item error as a
    KmsClientError. Raises KmsClientError if the request as a whole failed."""
    data = client.call("POST", path, {"items": list(bodies)})
    answers = data.get("results") if isinstance(data, dict) else None
    if not isinstance(answers, list) or len(answers) != len(bodies):
        raise KmsClientError("bad_response", "the server answered a different number of items")
    out: list[dict[str, Any] | KmsClientError] = []
    for answer in answers:
        error = answer.get("error") if isinstance(answer, dict) else {}
        if error is not None or not isinstance(answer, dict):
            err = error if isinstance(error, dict) else {}
            out.append(
                KmsClientError(
                    str(err.get("code", "bad_response")),
                    str(err.get("message", "unusable answer")),
                    request_id=err.get("request_id"),
                )
            )
        else:
            out.append(answer)
    return out


# -- JSON Lines ------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class JsonlRecord:
    """A parsed input line: ``item`` to rewrap, and where its blob sits in ``text``."""

    text: str
    span: tuple[int, int]
    item: RewrapItem

    def with_ciphertext(self, blob: bytes) -> str:
        """The line with only the blob's JSON value replaced; every other byte unchanged."""
        start, end = self.span
        return self.text[:start] + json.dumps(_b64(blob)) + self.text[end:]


def parse_jsonl_line(line: bytes, field: str, context_field: str | None) -> JsonlRecord:
    """Parse one line (without its newline). Raises InputError naming the problem."""
    try:
        text = line.decode("utf-8")
        obj = json.loads(text)
    except UnicodeDecodeError:
        raise InputError("not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError("not a JSON object")
    spans = _member_spans(text).get(field, [])
    if not spans:
        raise InputError(f"missing field {field!r}")
    if len(spans) > 1:
        raise InputError(f"field {field!r} appears more than once")
    value = obj[field]
    if not isinstance(value, str):
        raise InputError(f"field {field!r} is not a string")
    try:
        blob = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"field {field!r} is not valid base64") from None
    try:
        context = ctx.validate(obj.get(context_field) if context_field else None)
    except ctx.ContextError as e:
        raise InputError(f"field {context_field!r}: {e}") from None
    return JsonlRecord(text, spans[0], RewrapItem(blob, context))


def _member_spans(text: str) -> dict[str, list[tuple[int, int]]]:
    """Offsets of every top-level member's value in a JSON object already known valid."""
    spans: dict[str, list[tuple[int, int]]] = {}
    i = _skip(text, _skip(text, 0) + 1)  # past the "{"
    while text[i] != "}":
        key, i = _DECODER.raw_decode(text, i)
        start = _skip(text, _skip(text, i) + 1)  # past the ":"
        _, end = _DECODER.raw_decode(text, start)
        spans.setdefault(key, []).append((start, end))
        i = _skip(text, end)
        if text[i] == ",":
            i = _skip(text, i + 1)
    return spans


def _skip(text: str, i: int) -> int:
    """The index of the first non-whitespace character at or after ``i``."""
    match = _WS.match(text, i)
    assert match is not None  # the pattern matches the empty string
    return match.end()


# -- census -----------------------------------------------------------------------------------


@dataclass
class Census:
    """How many blobs use each key version; ``problems`` keeps the first few unreadable."""

    versions: dict[str, dict[int, int]] = field(default_factory=dict)
    unreadable: int = 0
    problems: list[str] = field(default_factory=list)

    MAX_PROBLEMS = 20

    def count(self, key_id: str | None, version: int | None, where: str, why: str = "") -> None:
        """Count one blob, or an unreadable one (key_id None) found at ``where``."""
        if key_id is None or version is None:
            self.unreadable += 1
            if len(self.problems) < self.MAX_PROBLEMS:
                self.problems.append(f"{where}: {why}")
            return
        per_key = self.versions.setdefault(key_id, {})
        per_key[version] = per_key.get(version, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "blobs": sum(sum(v.values()) for v in self.versions.values()),
            "unreadable": self.unreadable,
            "keys": {
                k: {str(v): n for v, n in sorted(per.items())}
                for k, per in sorted(self.versions.items())
            },
            "problems": list(self.problems),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Census:
        versions = {k: {int(v): int(n) for v, n in per.items()} for k, per in data["keys"].items()}
        return cls(versions, int(data["unreadable"]), [str(p) for p in data["problems"]])


def census_jsonl(lines: Iterable[bytes], field: str) -> Census:
    """Count the blobs under ``field`` of every non-blank line; no server involved."""
    out = Census()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            parsed = blobfmt.parse(
                parse_jsonl_line(line.rstrip(b"\n"), field, None).item.ciphertext
            )
        except (InputError, blobfmt.BlobError) as e:
            out.count(None, None, f"line {number}", str(e))
        else:
            out.count(parsed.key_id, parsed.key_version, f"line {number}")
    return out


# -- helpers ----------------------------------------------------------------------------------


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of at most ``size`` items."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_atomically(path: StrPath, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so a reader sees the old or new content,
    never a mix; durable once this returns."""
    with _atomic_output(path) as out:
        out.write(data)


def _failed(error: KmsClientError, blob: blobfmt.Blob | None = None) -> RewrapResult:
    key_id, version = (blob.key_id, blob.key_version) if blob else (None, None)
    return RewrapResult("failed", key_id, version, error=error)


def _local_error(e: Exception) -> KmsClientError:
    if isinstance(e, KmsClientError):
        return e
    if isinstance(e, OSError):
        return KmsClientError("io_error", e.strerror or type(e).__name__)
    return KmsClientError("invalid_input", str(e))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
