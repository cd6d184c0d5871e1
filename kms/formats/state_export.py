"""The state export: the sealed rows themselves, beside an audit bundle, so that the offline
verifier can recompute the public digest a format 2 checkpoint signed
(kms/formats/checkpoint.py, kms/formats/state.py).

``kms audit export-state`` writes one JSON object (UTF-8, keys sorted, no whitespace, a
final newline)::

    {"rows": [[kind, ident, seal], ...], "state_seq": N, "state_sha256": "<64 hex>", "v": 1}

    v             int  format version = 1
    state_seq     int  >= 0: the change ``n`` the rows are at; the server signed a checkpoint
                       with this ``state_seq`` just before writing the file
    state_sha256  str  64 lowercase hex: the public digest of ``rows`` (informative: the
                       verifier recomputes it and compares with the signed checkpoint's)
    rows          list every sealed row as ``[kind, ident, seal]`` (kms/formats/state.py):
                       ``kind`` 1..24 of ``a-z 0-9 _`` starting with a letter, ``ident``
                       the canonical JSON array (1..200 characters) of the row's key
                       columns (strings and integers), ``seal`` 64 lowercase hex or ``-``;
                       sorted by the writer, any order accepted, no (kind, ident) twice

Reading is strict and bounded: at most MAX_BYTES, no duplicate JSON keys, exactly these
fields, every value checked; anything else is a StateExportError saying what and where.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kms.formats.state import NO_SEAL, Entry, ident, public_digest

FORMAT_VERSION = 1
MAX_BYTES = 256 * 1024 * 1024  # about 1.5 million rows
MAX_IDENT = 200  # the state_changes.ident column
_FIELDS = frozenset({"v", "state_seq", "state_sha256", "rows"})
_KIND = re.compile(r"[a-z][a-z0-9_]{0,23}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_SEQ = 2**63 - 1


class StateExportError(ValueError):
    """The bytes are not a state export of a known version, or a value in it is malformed."""


@dataclass(frozen=True)
class StateExport:
    state_seq: int
    state_sha256: str  # as the file states it
    rows: tuple[Entry, ...]

    def digest(self) -> str:
        """The public digest of the rows, recomputed."""
        return public_digest(self.rows)


def encode(state_seq: int, entries: Iterable[Entry]) -> bytes:
    """The export of the sealed rows ``entries`` at change ``state_seq``; StateExportError
    if a row could not be read back (so no file is written that the verifier refuses)."""
    rows = sorted(entries)
    body = {
        "v": FORMAT_VERSION,
        "state_seq": state_seq,
        "state_sha256": public_digest(rows),
        "rows": [list(row) for row in rows],
    }
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"
    decode(data)
    return data


def decode(data: bytes) -> StateExport:
    """The state export in ``data``; StateExportError unless it is exactly format 1."""
    if len(data) > MAX_BYTES:
        raise StateExportError(f"larger than {MAX_BYTES} bytes")
    try:
        body = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except StateExportError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StateExportError(f"not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise StateExportError("not a JSON object")
    if "v" in body and (type(body["v"]) is not int or body["v"] != FORMAT_VERSION):
        raise StateExportError(f"unknown format version {body['v']!r} (this reader knows v 1)")
    if set(body) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(body)), sorted(set(body) - _FIELDS)
        raise StateExportError(
            "needs exactly the fields v, state_seq, state_sha256, rows"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)}" if extra else "")
        )
    seq, sha = body["state_seq"], body["state_sha256"]
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
        raise StateExportError("state_seq must be an integer >= 0")
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise StateExportError("state_sha256 must be 64 lowercase hex digits")
    if not isinstance(body["rows"], list):
        raise StateExportError("rows must be a list")
    return StateExport(seq, sha, _rows(body["rows"]))


def _rows(rows: list[Any]) -> tuple[Entry, ...]:
    seen: dict[tuple[str, str], int] = {}
    out = []
    for number, row in enumerate(rows, 1):
        where = f"row {number}"
        if not isinstance(row, list) or len(row) != 3 or not all(isinstance(x, str) for x in row):
            raise StateExportError(f"{where}: must be a list of three strings [kind, ident, seal]")
        kind, row_ident, seal = row
        if not _KIND.fullmatch(kind):
            raise StateExportError(f"{where}: kind {kind[:40]!r} is not a row kind")
        if not _canonical_ident(row_ident):
            raise StateExportError(
                f"{where}: ident {row_ident[:80]!r} is not the canonical JSON array of the "
                "row's key columns"
            )
        if seal != NO_SEAL and not _HEX64.fullmatch(seal):
            raise StateExportError(f"{where}: seal must be 64 lowercase hex digits or '-'")
        first = seen.setdefault((kind, row_ident), number)
        if first != number:
            raise StateExportError(f"{where}: duplicates row {first} ({kind} {row_ident})")
        out.append((kind, row_ident, seal))
    return tuple(out)


def _canonical_ident(text: str) -> bool:
    if not 1 <= len(text) <= MAX_IDENT:
        return False
    try:
        values = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(values, list)
        and bool(values)
        and all(type(v) in (str, int) for v in values)
        and ident(values) == text
    )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body = dict(pairs)
    if len(body) != len(pairs):
        names = [k for k, _ in pairs]
        twice = sorted({k for k in names if names.count(k) > 1})
        raise StateExportError("a JSON object has the key twice: " + ", ".join(twice)[:80])
    return body
