"""Bulk rewrap pieces that need no server: JSON Lines splicing, the census, re-sealing an
envelope under a new wrapped DEK, local item failures and the resume state file."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
from pathlib import Path

import pytest

from kms.cli.rewrap.run import Refused, Run
from kms.client import KmsClient, KmsClientError
from kms.client.envelope import open_stream, seal_stream
from kms.client.rewrap import (
    BulkRewrapper,
    InputError,
    RewrapItem,
    RewrapResult,
    census_jsonl,
    parse_jsonl_line,
)
from kms.client.rewrap_files import _reseal
from kms.formats import blob as blobfmt
from kms.formats import envelope as env


def _blob(key_id: str = "k1", version: int = 1) -> bytes:
    header = blobfmt.header_for(key_id, version, os.urandom(12))
    return header.to_bytes() + os.urandom(48)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- JSON Lines --------------------------------------------------------------------------------


def test_splice_replaces_only_the_top_level_blob() -> None:
    old, new = _blob(version=1), _blob(version=2)
    line = (
        '  { "nested" : {"ciphertext": "keep"}, "cipher\\u0074ext"  :\t"BLOB" ,'
        ' "n": 1.50, "t": "caf\u00e9\\n", "context": {"a": "b"} }\r'
    ).replace("BLOB", _b64(old))
    record = parse_jsonl_line(line.encode(), "ciphertext", "context")
    assert record.item == RewrapItem(old, {"a": "b"})
    spliced = record.with_ciphertext(new)
    assert spliced == line.replace(_b64(old), _b64(new))
    assert json.loads(spliced)["nested"] == {"ciphertext": "keep"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"ciphertext": "AA==", "ciphertext": "AA=="}', "appears more than once"),
        (b'{"blob": "AA=="}', "missing field 'ciphertext'"),
        (b'{"ciphertext": 12}', "is not a string"),
        (b'{"ciphertext": "AA=\\n="}', "not valid base64"),
        (b'{"ciphertext": "AA==", "context": {"a": 1}}', "field 'context'"),
        (b'"just a string"', "not a JSON object"),
        (b'{"ciphertext": "AA==",}', "not valid JSON"),
        (b'\xc3{"ciphertext": "AA=="}', "not valid UTF-8"),
    ],
)
def test_unusable_lines_name_the_problem(line: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_jsonl_line(line, "ciphertext", "context")


def test_null_or_ignored_context_is_empty() -> None:
    line = json.dumps({"ciphertext": _b64(b"x"), "context": None}).encode()
    assert parse_jsonl_line(line, "ciphertext", "context").item.context == {}
    line = json.dumps({"ciphertext": _b64(b"x"), "context": "not an object"}).encode()
    assert parse_jsonl_line(line, "ciphertext", None).item.context == {}


def test_census_counts_versions_and_names_bad_lines() -> None:
    lines = [json.dumps({"c": _b64(_blob("k1", v))}).encode() + b"\n" for v in (1, 1, 2)]
    lines += [b"\n", json.dumps({"c": _b64(_blob("k2", 7))}).encode() + b"\n"]
    lines += [b'{"c": "AAAA"}\n', b"nope\n"]
    census = census_jsonl(io.BytesIO(b"".join(lines)), "c").to_json()
    assert census["keys"] == {"k1": {"1": 2, "2": 1}, "k2": {"7": 1}}
    assert census["blobs"] == 4 and census["unreadable"] == 2
    assert census["problems"][0] == "line 6: not a KMS blob"
    assert census["problems"][1].startswith("line 7: not valid JSON")


# -- local failures never reach the server ---------------------------------------------------


def test_unusable_items_fail_locally() -> None:
    # Nothing listens on this port: any request would raise transport_error.
    bulk = BulkRewrapper(KmsClient("http://127.0.0.1:9", "kms_x"), batch_size=10)
    bulk.known_current["k1"] = 2
    results = bulk.rewrap(
        [
            RewrapItem(b"garbage"),
            RewrapItem(_blob(), {"": "empty key"}),
            RewrapItem(_blob("k1", 2)),
            RewrapItem(_blob("k1", 3)),
        ]
    )
    assert [r.status for r in results] == ["failed", "failed", "current", "current"]
    assert [r.error.code for r in results[:2] if r.error] == ["malformed_blob", "invalid_context"]
    with pytest.raises(KmsClientError, match="transport_error"):
        bulk.rewrap([RewrapItem(_blob("k1", 1))])
    with pytest.raises(KmsClientError, match="batch_size"):
        BulkRewrapper(KmsClient("http://127.0.0.1:9", "kms_x"), batch_size=1001)


# -- re-sealing an envelope ------------------------------------------------------------------


def _sealed(tmp_path: Path, data: bytes, context: dict[str, str]) -> tuple[Path, bytes, bytes]:
    dek, wrapped = os.urandom(32), _blob(version=1)
    out = io.BytesIO()
    seal_stream(dek, wrapped, io.BytesIO(data), out, context, segment_size=4096)
    path = tmp_path / "file.kms"
    path.write_bytes(out.getvalue())
    return path, dek, wrapped


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 5])
def test_reseal_keeps_the_data_under_the_new_header(tmp_path: Path, size: int) -> None:
    data, context = os.urandom(size), {"f": "1"}
    path, dek, wrapped = _sealed(tmp_path, data, context)
    path.chmod(0o640)
    old_size = path.stat().st_size
    old_header = env.read_header(io.BytesIO(path.read_bytes()))
    new_wrapped = _blob(version=2)

    _reseal((path, context), wrapped, new_wrapped, {"plaintext": _b64(dek)})

    header = env.read_header(io.BytesIO(path.read_bytes()))
    assert header.wrapped_dek == new_wrapped and header.segment_size == 4096
    assert header.nonce_prefix[:3] != old_header.nonce_prefix[:3]
    out = io.BytesIO()
    open_stream(io.BytesIO(path.read_bytes()), out, context, lambda w: dek)
    assert out.getvalue() == data
    assert path.stat().st_size == old_size + len(new_wrapped) - len(wrapped)  # same segments
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    with pytest.raises(KmsClientError, match="decryption_failed"):  # old header: AAD differs
        open_stream(
            io.BytesIO(old_header.to_bytes() + path.read_bytes()[header.size :]),
            io.BytesIO(),
            context,
            lambda w: dek,
        )


@pytest.mark.parametrize("corrupt", ["last byte", "wrong context", "wrong dek", "changed"])
def test_reseal_leaves_a_bad_envelope_untouched(tmp_path: Path, corrupt: str) -> None:
    context = {"f": "1"}
    path, dek, wrapped = _sealed(tmp_path, os.urandom(10_000), context)
    if corrupt == "last byte":
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    original = path.read_bytes()
    use_context = {"f": "2"} if corrupt == "wrong context" else context
    use_dek = os.urandom(32) if corrupt == "wrong dek" else dek
    old = _blob() if corrupt == "changed" else wrapped

    with pytest.raises((KmsClientError, InputError)):
        _reseal((path, use_context), old, _blob(version=2), {"plaintext": _b64(use_dek)})

    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.kms"]  # no temp file left


def test_reseal_refuses_an_unusable_decrypt_answer(tmp_path: Path) -> None:
    path, _, wrapped = _sealed(tmp_path, b"x", {})
    for answer in ({}, {"plaintext": _b64(b"short")}):
        with pytest.raises(KmsClientError, match="bad_response"):
            _reseal((path, {}), wrapped, _blob(version=2), answer)


# -- the state file --------------------------------------------------------------------------


def test_state_survives_a_reload_and_refuses_another_run(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    run_id = {"mode": "jsonl", "input": "/in"}
    assert Run.load(path, run_id) is None
    run = Run.start(path, run_id, {"lines": 0})
    run.record("line 1", RewrapResult("rewrapped", "k1", 2, b"x"))
    run.record("line 2", None, "not valid JSON")
    run.record("line 3", RewrapResult("failed", "k1", 1, error=KmsClientError("forbidden", "no")))
    run.commit({"lines": 3})

    again = Run.load(path, run_id)
    assert again is not None and again.position == {"lines": 3}
    assert again.state["counts"] == {"rewrapped": 1, "current": 0, "failed": 2}
    assert again.census.versions == {"k1": {2: 1, 1: 1}} and again.census.unreadable == 1
    assert [f["at"] for f in again.state["failures"]] == ["line 2", "line 3"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    with pytest.raises(Refused, match="belongs to another run"):
        Run.load(path, {**run_id, "input": "/other"})
    path.write_text('{"format": "something else"}')
    with pytest.raises(Refused, match="not a kms rewrap state file"):
        Run.load(path, run_id)
    path.write_bytes(b"\xff\x00")
    with pytest.raises(Refused, match="unreadable state file"):
        Run.load(path, run_id)
