"""Frozen vectors and edge cases for the pure wire formats."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kms.formats import audit_record as a
from kms.formats import blob as b
from kms.formats import context as c
from kms.services.audit_events import format_time

# -- encryption context -------------------------------------------------------------------


def test_context_vectors_are_frozen() -> None:
    assert c.encode({}).hex() == "0000"
    assert c.encode({"ab": "c"}).hex() == "000100026162000163"
    assert c.encode({"a": "bc"}).hex() == "000100016100026263"
    assert c.encode({"tenant": "42", "é": "ü"}).hex() == (
        "0002000674656e616e74000234320002c3a90002c3bc"
    )


def test_context_order_does_not_matter() -> None:
    assert c.encode({"x": "1", "a": "2"}) == c.encode({"a": "2", "x": "1"})


@given(
    st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=5),
    st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=5),
)
def test_context_encoding_is_injective(x: dict[str, str], y: dict[str, str]) -> None:
    if x != y:
        assert c.encode(x) != c.encode(y)


@pytest.mark.parametrize(
    "bad",
    [
        "tenant=42",
        ["a"],
        {"a": 1},
        {"": "x"},
        {"k" * 257: "v"},
        {"k": "v" * 1025},
        {f"k{i}": "v" for i in range(65)},
        {"\ud800": "lone surrogate"},
    ],
)
def test_context_validation_refuses(bad: object) -> None:
    with pytest.raises(c.ContextError):
        c.validate(bad)


# -- blob ---------------------------------------------------------------------------------

BLOB = b.Blob("key-1", 7, bytes(range(12)), bytes(range(100, 148)))
BLOB_HEX = (
    "4b4d535701056b65792d3100000007000102030405060708090a0b"
    "6465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
    "808182838485868788898a8b8c8d8e8f90919293"
)


def test_blob_vector_is_frozen() -> None:
    assert BLOB.to_bytes().hex() == BLOB_HEX
    assert b.parse(bytes.fromhex(BLOB_HEX)) == BLOB
    assert BLOB.aad({"a": "b"}).hex() == "4b4d535701056b65792d31000000070001000161000162"


def _mutate(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1 :]


RAW = bytes.fromhex(BLOB_HEX)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        RAW[:5],
        b"XXXX" + RAW[4:],  # bad magic
        _mutate(RAW, 4, 2),  # unknown format version
        _mutate(RAW, 5, 0),  # key id length 0
        _mutate(RAW, 5, 65),  # key id length over the limit
        _mutate(RAW, 5, 200),  # key id length past the end
        RAW[: 6 + 5 + 4 + 12 + 15],  # shorter than a tag
        RAW[:6] + b"key\x001" + RAW[11:],  # non-printable key id
        RAW[:11] + struct.pack(">I", 0) + RAW[15:],  # version 0
        RAW + b"\x00" * b.MAX_BLOB_BYTES,  # oversized
    ],
)
def test_blob_parse_refuses_malformed(data: bytes) -> None:
    with pytest.raises(b.BlobError):
        b.parse(data)


@given(st.binary(max_size=200))
def test_blob_parse_never_fails_otherwise(data: bytes) -> None:
    try:
        parsed = b.parse(data)
    except b.BlobError:
        return
    assert parsed.to_bytes() == data


# -- audit records ------------------------------------------------------------------------


def _record(seq: int = 1, prev: str = a.GENESIS_HASH, **changes: object) -> dict[str, object]:
    rec: dict[str, object] = {
        "v": 1,
        "seq": seq,
        "time": "2026-01-01T00:00:00.000Z",
        "request_id": "r1",
        "principal": "svc",
        "operation": "decrypt",
        "key_id": "k",
        "key_version": 1,
        "context_sha256": c.digest({}),
        "justification": "service_processing",
        "case_id": None,
        "outcome": "ok",
        "detail": None,
        "prev_hash": prev,
    }
    rec.update(changes)
    return rec


def test_audit_record_vector_is_frozen() -> None:
    rec = _record()
    assert a.canonical_bytes(rec) == (
        b'KMS-AUDIT-1\n{"case_id":null,"context_sha256":"96a296d224f285c67bee93c30f8a3091'
        b'57f0daa35dc5b87e410b78630a09cfc7","detail":null,"justification":"service_processing",'
        b'"key_id":"k","key_version":1,"operation":"decrypt","outcome":"ok","prev_hash":"'
        + b"0" * 64
        + b'","principal":"svc","request_id":"r1","seq":1,"time":"2026-01-01T00:00:00.000Z","v":1}'
    )
    assert a.record_hash(rec) == "e88fa25a20c49697672201129235b28985257d12196b060d4daa2b1cf3539362"


@pytest.mark.parametrize(
    "changes",
    [{"seq": "1"}, {"v": 2}, {"outcome": None}, {"key_version": True}, {"extra": 1}],
)
def test_audit_record_refuses_wrong_shape(changes: dict[str, object]) -> None:
    with pytest.raises(a.RecordError):
        a.canonical_bytes(_record(**changes))


_text = st.text(max_size=40)  # any Unicode: escaping must match the whole-record encoding
_maybe = st.none() | _text


@given(
    st.fixed_dictionaries(
        {
            "request_id": _text,
            "principal": _maybe,
            "operation": _text,
            "key_id": _maybe,
            "key_version": st.none() | st.integers(0, 2**40),
            "context_sha256": _maybe,
            "justification": _maybe,
            "case_id": _maybe,
            "outcome": _text,
            "detail": _maybe,
        }
    ),
    st.integers(1, 2**62),
    _text,
    _text,
)
def test_a_sealed_draft_hashes_as_the_whole_record(
    fields: dict[str, object], seq: int, time: str, prev: str
) -> None:
    sealed = a.Draft({"v": 1, **fields}).seal(seq, time, prev)
    body = {k: v for k, v in sealed.items() if k != "hash"}
    assert body == {"v": 1, **fields, "seq": seq, "time": time, "prev_hash": prev}
    assert sealed["hash"] == a.record_hash(body)


def test_a_draft_refuses_what_a_record_refuses() -> None:
    fields = {k: v for k, v in _record().items() if k not in a.CHAIN_FIELDS}
    with pytest.raises(a.RecordError):
        a.Draft({**fields, "v": 2})
    with pytest.raises(a.RecordError):
        a.Draft({**fields, "seq": 1})
    with pytest.raises(a.RecordError):
        a.Draft(fields).seal(True, "2026-01-01T00:00:00.000Z", a.GENESIS_HASH)
    assert a.Draft(fields).seal(1, "2026-01-01T00:00:00.000Z", a.GENESIS_HASH)["hash"] == (
        a.record_hash(_record())
    )


def _chain(n: int) -> list[dict[str, object]]:
    out, prev = [], a.GENESIS_HASH
    for seq in range(1, n + 1):
        rec = _record(seq, prev, request_id=f"r{seq}")
        rec["hash"] = prev = a.record_hash(rec)
        out.append(rec)
    return out


def test_chain_verifies_and_detects_each_kind_of_tampering() -> None:
    chain = _chain(5)
    assert a.verify_chain(chain) == chain[-1]["hash"]
    edited = [dict(r) for r in chain]
    edited[2]["principal"] = "mallory"
    deleted = chain[:2] + chain[3:]
    reordered = [chain[0], chain[2], chain[1], *chain[3:]]
    duplicated = [*chain[:3], chain[2], *chain[3:]]
    rehashed = [dict(r) for r in chain]
    rehashed[2]["principal"] = "mallory"
    rehashed[2]["hash"] = a.record_hash({k: v for k, v in rehashed[2].items() if k != "hash"})
    for bad, at in ((edited, 3), (deleted, 3), (reordered, 2), (duplicated, 4), (rehashed, 4)):
        with pytest.raises(a.ChainError) as info:
            a.verify_chain(bad)
        assert info.value.seq == at


def test_audit_time_format_is_fixed() -> None:
    when = datetime(2026, 11, 28, 7, 5, 9, 999_999, tzinfo=UTC)
    assert format_time(when) == "2026-11-28T07:05:09.999Z"  # truncated, never rounded up
    assert format_time(when.replace(microsecond=0)) == "2026-11-28T07:05:09.000Z"


@given(st.datetimes(min_value=datetime(1000, 1, 1), timezones=st.sampled_from([UTC, None])))
def test_audit_time_is_the_documented_text(when: datetime) -> None:
    # the record format's "YYYY-MM-DDTHH:MM:SS.mmmZ", as strftime spells it
    expected = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    assert format_time(when) == expected
