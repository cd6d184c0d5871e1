"""The state export file (kms/formats/state_export.py): a frozen vector, and strict,
bounded reading: every malformed file is one StateExportError saying what is wrong."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from kms.formats import state_export as se

ROWS = [
    ("grant", '["k-1",2]', "ab" * 32),
    ("principal", "[2]", "-"),
    ("key", '["k-1"]', "01" * 32),
]
DIGEST = "4fa4ff0b75e6758aace3d529e852acd36c6b12578e7ead45c766bfc90d3af7fc"


def test_the_vector_is_frozen() -> None:
    lines = "".join(f"{k}\t{i}\t{s}\n" for k, i, s in sorted(ROWS))
    assert hashlib.sha256(lines.encode()).hexdigest() == DIGEST
    assert se.encode(7, ROWS) == (
        b'{"rows":[["grant","[\\"k-1\\",2]","'
        + b"ab" * 32
        + b'"],["key","[\\"k-1\\"]","'
        + b"01" * 32
        + b'"],["principal","[2]","-"]],"state_seq":7,"state_sha256":"'
        + DIGEST.encode()
        + b'","v":1}\n'
    )


def test_a_written_export_reads_back() -> None:
    export = se.decode(se.encode(7, ROWS))
    assert export.state_seq == 7
    assert export.state_sha256 == DIGEST == export.digest()
    assert export.rows == tuple(sorted(ROWS))
    assert se.decode(se.encode(0, [])).rows == ()


def test_rows_in_any_order_have_the_same_digest() -> None:
    body = json.loads(se.encode(7, ROWS))
    body["rows"].reverse()
    assert se.decode(json.dumps(body).encode()).digest() == DIGEST


def _file(**changes: Any) -> bytes:
    body = json.loads(se.encode(7, ROWS))
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not _DROP}).encode()


def _row(row: Any) -> bytes:
    return _file(rows=[*[list(r) for r in ROWS], row])


_DROP = object()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'"x"', "not a JSON object"),
        (_file(v=2), "unknown format version 2"),
        (_file(v=True), "unknown format version True"),
        (_file(v="1"), "unknown format version '1'"),
        (_file(v=_DROP), "missing v"),
        (_file(rows=_DROP), "missing rows"),
        (_file(extra=1), "unexpected extra"),
        (_file(state_seq=-1), "state_seq must be an integer >= 0"),
        (_file(state_seq="7"), "state_seq must be an integer >= 0"),
        (_file(state_seq=True), "state_seq must be an integer >= 0"),
        (_file(state_seq=7.0), "state_seq must be an integer >= 0"),
        (_file(state_seq=2**63), "state_seq must be an integer >= 0"),
        (_file(state_sha256="AB" * 32), "state_sha256 must be 64 lowercase hex"),
        (_file(state_sha256="ab" * 31), "state_sha256 must be 64 lowercase hex"),
        (_file(state_sha256=None), "state_sha256 must be 64 lowercase hex"),
        (_file(rows={}), "rows must be a list"),
        (_file(rows="x"), "rows must be a list"),
        (_row("grant"), "row 4: must be a list of three strings"),
        (_row(["grant", '["k-2",2]']), "row 4: must be a list of three strings"),
        (_row(["grant", '["k-2",2]', "ab" * 32, "x"]), "row 4: must be a list of three"),
        (_row(["grant", ["k-2", 2], "ab" * 32]), "row 4: must be a list of three strings"),
        (_row(["grant", '["k-2",2]', None]), "row 4: must be a list of three strings"),
        (_row(["Grant", '["k-2",2]', "ab" * 32]), "row 4: kind 'Grant' is not a row kind"),
        (_row(["", '["k-2",2]', "ab" * 32]), "row 4: kind '' is not a row kind"),
        (_row(["g\t", '["k-2",2]', "ab" * 32]), "row 4: kind"),
        (_row(["g" * 25, '["k-2",2]', "ab" * 32]), "row 4: kind"),
        (_row(["grant", '["k-2", 2]', "ab" * 32]), "row 4: ident .* is not the canonical"),
        (_row(["grant", '"k-2"', "ab" * 32]), "row 4: ident"),
        (_row(["grant", "[]", "ab" * 32]), "row 4: ident"),
        (_row(["grant", "[1.5]", "ab" * 32]), "row 4: ident"),
        (_row(["grant", "[true]", "ab" * 32]), "row 4: ident"),
        (_row(["grant", '[["k"]]', "ab" * 32]), "row 4: ident"),
        (_row(["grant", '["\t"]', "ab" * 32]), "row 4: ident"),
        (_row(["grant", "[" + "1," * 100 + "1]", "ab" * 32]), "row 4: ident"),
        (_row(["grant", '["k-2",2]', "AB" * 32]), "row 4: seal must be 64 lowercase hex"),
        (_row(["grant", '["k-2",2]', "ab" * 31]), "row 4: seal must be 64 lowercase hex"),
        (_row(["grant", '["k-2",2]', ""]), "row 4: seal must be 64 lowercase hex"),
        (_row(["grant", '["k-2",2]', "ab" * 32 + "\n"]), "row 4: seal must be 64"),
        (_row(["grant", '["k-1",2]', "cd" * 32]), r"row 4: duplicates row 1 \(grant"),
        (_row(["grant", '["k-1",2]', "ab" * 32]), r"row 4: duplicates row 1 \(grant"),
        (
            b'{"v":1,"state_seq":7,"state_seq":8,"state_sha256":"' + DIGEST.encode() + b'",'
            b'"rows":[]}',
            "has the key twice: state_seq",
        ),
    ],
)
def test_a_malformed_export_is_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(se.StateExportError, match=message):
        se.decode(data)


def test_the_size_is_bounded_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    data = se.encode(7, ROWS)
    monkeypatch.setattr(se, "MAX_BYTES", len(data) - 1)
    with pytest.raises(se.StateExportError, match="larger than"):
        se.decode(data)


def test_the_writer_refuses_rows_the_reader_would_refuse() -> None:
    with pytest.raises(se.StateExportError, match="seal must be"):
        se.encode(7, [("grant", '["k-1",2]', "not a seal")])
    with pytest.raises(se.StateExportError, match="duplicates"):
        se.encode(7, [("grant", '["k-1",2]', "ab" * 32), ("grant", '["k-1",2]', "cd" * 32)])
