"""Canonical encoding and hash chaining of audit records.

A record is a flat map whose values are strings, integers or null. Format version 1 has
exactly these fields::

    v              int    format version = 1
    seq            int    position in the chain, 1, 2, 3, ... without gaps
    time           str    UTC, "YYYY-MM-DDTHH:MM:SS.mmmZ"
    request_id     str    the request that caused the record
    principal      str?   name of the authenticated principal (null if unauthenticated)
    operation      str    e.g. "decrypt", "create_key", "rotate_key"
    key_id         str?   key the operation used or changed
    key_version    int?   key version used
    context_sha256 str?   hex keyed hash of the encryption context (see below)
    justification  str?   justification code of an unwrap
    case_id        str?   escrow case, if any
    outcome        str    "ok" or the error code returned to the caller
    detail         str?   precise reason of a failure (never secret material)
    prev_hash      str    hex hash of record seq-1 (64 zeros for seq 1)

The canonical bytes are ``b"KMS-AUDIT-1\\n"`` followed by the JSON text of the record
with keys sorted, separators ``,`` and ``:``, no whitespace, and every non-ASCII character
escaped as ``\\uXXXX`` (Python's ``json.dumps(..., sort_keys=True, separators=(",", ":"),
ensure_ascii=True)``). The record hash is the hex SHA-256 of those bytes. Because each
record includes its predecessor's hash, editing, deleting, inserting or reordering any
record changes every later hash.

``context_sha256`` is, since keyed context hashes, the HSM's HMAC-SHA256 of
``b"KMS-CONTEXT-1\\n"`` and the canonical context encoding (kms/formats/context.py);
records written before hold the unkeyed SHA-256 of the encoding. The name and the format
version are kept on purpose: nothing here or in the verifier recomputes the value (it is
an opaque 64-hex identifier of the context), so every format-1 record, old or new, is
encoded, hashed and verified exactly as before. Only the server can compute a keyed
hash: auditors match a context through its audited query (docs/auditing.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

FORMAT_VERSION = 1
PREFIX = b"KMS-AUDIT-1\n"
GENESIS_HASH = "0" * 64
FIELDS = (
    "v",
    "seq",
    "time",
    "request_id",
    "principal",
    "operation",
    "key_id",
    "key_version",
    "context_sha256",
    "justification",
    "case_id",
    "outcome",
    "detail",
    "prev_hash",
)
_INT_FIELDS = {"v", "seq", "key_version"}
_REQUIRED = {"v", "seq", "time", "request_id", "operation", "outcome", "prev_hash"}


class RecordError(ValueError):
    """A record does not have exactly the fields and types of its format version."""


def check(record: Mapping[str, Any]) -> None:
    """Raise RecordError unless ``record`` has exactly the v1 fields with the right types."""
    if set(record) != set(FIELDS):
        missing = sorted(set(FIELDS) - set(record))
        extra = sorted(set(record) - set(FIELDS))
        raise RecordError(f"record fields differ: missing {missing}, unexpected {extra}")
    for name in FIELDS:
        value = record[name]
        if value is None:
            if name in _REQUIRED:
                raise RecordError(f"field {name!r} must not be null")
            continue
        want = int if name in _INT_FIELDS else str
        if type(value) is not want:
            raise RecordError(f"field {name!r} must be {want.__name__}")
    if record["v"] != FORMAT_VERSION:
        raise RecordError("unknown record format version")


def canonical_bytes(record: Mapping[str, Any]) -> bytes:
    """The exact bytes that are hashed (see module docstring)."""
    check(record)
    return PREFIX + _CANONICAL.encode({name: record[name] for name in FIELDS}).encode("ascii")


def record_hash(record: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical bytes; covers ``prev_hash`` and so the whole chain."""
    return hashlib.sha256(canonical_bytes(record)).hexdigest()


CHAIN_FIELDS = ("seq", "time", "prev_hash")  # known only once the record is chained
_ORDER = sorted(FIELDS)


class Draft:
    """A record's fields other than CHAIN_FIELDS, checked and encoded once, so that
    chaining it (under the database's writer lock) costs a join and one SHA-256.
    ``seal`` gives exactly the hash record_hash gives for the same record."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        if set(fields) & set(CHAIN_FIELDS):
            raise RecordError("a draft has no seq, time or prev_hash")
        check({**fields, "seq": 1, "time": "", "prev_hash": GENESIS_HASH})
        self.fields = dict(fields)
        # the sorted members, with each run of fixed members encoded in one piece
        self._parts: list[str] = []
        run: dict[str, Any] = {}
        for name in _ORDER:
            if name in CHAIN_FIELDS:
                if run:
                    self._parts.append(_members(run))
                    run = {}
                self._parts.append(name)
            else:
                run[name] = fields[name]
        if run:
            self._parts.append(_members(run))

    def seal(self, seq: int, time: str, prev_hash: str) -> dict[str, Any]:
        """The complete record with its ``hash``, at ``seq`` after ``prev_hash``."""
        if type(seq) is not int or type(time) is not str or type(prev_hash) is not str:
            raise RecordError("seq must be int, time and prev_hash str")
        chained = {"seq": seq, "time": time, "prev_hash": prev_hash}
        encoded = {"seq": str(seq), "time": _string(time), "prev_hash": _string(prev_hash)}
        text = ",".join(
            f'"{part}":{encoded[part]}' if part in encoded else part for part in self._parts
        )
        digest = hashlib.sha256(PREFIX + b"{" + text.encode("ascii") + b"}").hexdigest()
        return {**self.fields, **chained, "hash": digest}


def _members(values: dict[str, Any]) -> str:
    """``values`` as canonical JSON object members, without the braces."""
    return _CANONICAL.encode(values)[1:-1]


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
_string = _CANONICAL.encode  # a str as a JSON string, escaped as in the whole record


class ChainError(ValueError):
    """The records do not form an unbroken chain; ``seq`` is the position (the seq the
    chain expected next) where it breaks."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"audit chain broken at seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason


def verify_chain(
    records: Sequence[Mapping[str, Any]], prev_hash: str = GENESIS_HASH, first_seq: int = 1
) -> str:
    """Check that ``records`` (each with its stored ``hash``) continue the chain from
    ``prev_hash`` at ``first_seq`` with no gap, edit, insertion or reordering; returns the
    hash of the last record. Raises ChainError at the first break."""
    expected_seq = first_seq
    for stored in records:
        body = {k: v for k, v in stored.items() if k != "hash"}
        try:
            computed = record_hash(body)
        except RecordError as e:
            raise ChainError(expected_seq, str(e)) from None
        if stored["seq"] != expected_seq:
            raise ChainError(expected_seq, f"found seq {stored['seq']}")
        if stored["prev_hash"] != prev_hash:
            raise ChainError(expected_seq, "prev_hash does not match the previous record")
        if stored.get("hash") != computed:
            raise ChainError(expected_seq, "record hash does not match its content")
        prev_hash = computed
        expected_seq += 1
    return prev_hash
