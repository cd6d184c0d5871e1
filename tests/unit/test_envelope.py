"""Envelope format and streaming encryption: round trips, frozen vectors, and the corruption
checklist. The unwrap step is a local fake here (the data layer is under test; the server
path is tested elsewhere): it returns the fixed DEK for the fixed wrapped bytes only."""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.client.envelope import (
    decrypt_bytes,
    decrypt_file,
    encrypt_bytes,
    encrypt_file,
    open_stream,
    seal_stream,
)
from kms.client.http import DataKey, KmsClientError
from kms.formats import context as ctx
from kms.formats import envelope as env

S = 4096
DEK = bytes(range(32))
OTHER_DEK = bytes(range(100, 132))
WRAPPED = b"wrapped-dek-test-vector"
PREFIX = bytes.fromhex("f0f1f2f3f4f5f6")
CONTEXT = {"tenant": "42", "purpose": "kat"}
HEADER_LEN = 18 + len(WRAPPED)  # 41
WIRE = S + 16  # a full segment on the wire


def fake_unwrap(dek: bytes = DEK) -> Callable[[bytes], bytes]:
    def unwrap(wrapped: bytes) -> bytes:
        if wrapped != WRAPPED:
            raise ValueError("unknown wrapped key")
        return dek

    return unwrap


def seal(
    plaintext: bytes,
    context: Mapping[str, str] | None = CONTEXT,
    *,
    segment_size: int = S,
    prefix: bytes | None = PREFIX,
) -> bytes:
    out = io.BytesIO()
    seal_stream(
        DEK,
        WRAPPED,
        io.BytesIO(plaintext),
        out,
        context,
        segment_size=segment_size,
        nonce_prefix=prefix,
    )
    return out.getvalue()


def open_(
    data: bytes,
    context: Mapping[str, str] | None = CONTEXT,
    unwrap: Callable[[bytes], bytes] | None = None,
) -> bytes:
    out = io.BytesIO()
    open_stream(io.BytesIO(data), out, context, unwrap or fake_unwrap())
    return out.getvalue()


def assert_fails(
    data: bytes,
    context: Mapping[str, str] | None = CONTEXT,
    unwrap: Callable[[bytes], bytes] | None = None,
) -> KmsClientError:
    with pytest.raises(KmsClientError) as info:
        open_(data, context, unwrap)
    err = info.value
    assert err.code == "decryption_failed"
    assert err.message == "the envelope could not be decrypted"
    # No oracle: nothing chained that would say which check failed.
    assert err.__cause__ is None and err.__context__ is None
    return err


def pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, S - 1, S, S + 1, 3 * S])
def test_round_trip_sizes(size: int) -> None:
    plaintext = os.urandom(size)
    data = seal(plaintext, prefix=None)
    segments = max(1, -(-size // S))
    assert len(data) == HEADER_LEN + size + 16 * segments
    assert open_(data) == plaintext


def test_empty_plaintext_is_one_empty_final_segment() -> None:
    data = seal(b"")
    assert len(data) == HEADER_LEN + 16


def test_default_segment_size_and_random_prefix() -> None:
    a, b = seal(b"x", prefix=None, segment_size=65536), seal(b"x", prefix=None, segment_size=65536)
    assert env.read_header(io.BytesIO(a)).segment_size == 65536
    assert a != b  # fresh nonce prefix
    assert open_(a) == open_(b) == b"x"


class Trickle(io.RawIOBase):
    """A raw stream that reads and writes at most 7 bytes per call."""

    def __init__(self, data: bytes = b"") -> None:
        self.data, self.pos, self.out = data, 0, bytearray()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(7, len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def write(self, buf: Any) -> int:
        n = min(7, len(buf))
        self.out += bytes(buf[:n])
        return n


def test_short_reads_and_partial_writes() -> None:
    plaintext = pattern(2 * S + 5)
    sink = Trickle()
    seal_stream(DEK, WRAPPED, Trickle(plaintext), sink, CONTEXT, segment_size=S)  # type: ignore[arg-type]
    assert open_(bytes(sink.out)) == plaintext
    back = Trickle()
    open_stream(Trickle(bytes(sink.out)), back, CONTEXT, fake_unwrap())  # type: ignore[arg-type]
    assert bytes(back.out) == plaintext


# -- frozen vectors --------------------------------------------------------------------------

KAT_PLAINTEXT = b"The quick brown fox jumps over the lazy dog"
KAT_HEX = (
    "4b4d534501000010000017777261707065642d64656b2d746573742d76656374"
    "6f72f0f1f2f3f4f5f6a0ca7b7953c2f772093681e600938b4e9c1bb39668a67c"
    "2c19450f13705ff6ae8e280d1598d1b4de314a974e9a693a1e23c0c7f9d0ec68"
    "9943813a"
)
KAT_EMPTY_NO_CONTEXT_HEX = (
    "4b4d534501000010000017777261707065642d64656b2d746573742d766563746f72"
    "f0f1f2f3f4f5f623c56610fe90cbae5b018caadd11a101"
)
KAT_MULTI_SHA256 = "3e2e72458e88864fd02f991de4a359e7babae389072e6e107d7787235d64aba4"


def test_known_answer_vector() -> None:
    data = seal(KAT_PLAINTEXT)
    assert data.hex() == KAT_HEX
    assert open_(bytes.fromhex(KAT_HEX)) == KAT_PLAINTEXT


def test_known_answer_empty_without_context() -> None:
    assert seal(b"", None).hex() == KAT_EMPTY_NO_CONTEXT_HEX
    assert open_(bytes.fromhex(KAT_EMPTY_NO_CONTEXT_HEX), None) == b""


def test_known_answer_multi_segment() -> None:
    data = seal(pattern(2 * S + 100))
    assert len(data) == HEADER_LEN + 3 * 16 + 2 * S + 100
    assert hashlib.sha256(data).hexdigest() == KAT_MULTI_SHA256
    assert open_(data) == pattern(2 * S + 100)


def test_layout_matches_documentation() -> None:
    """Rebuild the envelope from the documented layout alone, without the module's code."""
    plaintext = pattern(2 * S + 100)
    header = (
        b"KMSE"
        + bytes([1])
        + struct.pack(">I", S)
        + struct.pack(">H", len(WRAPPED))
        + WRAPPED
        + PREFIX
    )
    aad = header + ctx.encode(CONTEXT)
    aead = AESGCM(DEK)
    pieces = [plaintext[:S], plaintext[S : 2 * S], plaintext[2 * S :]]
    body = b"".join(
        aead.encrypt(PREFIX + struct.pack(">IB", i, int(i == 2)), piece, aad)
        for i, piece in enumerate(pieces)
    )
    assert seal(plaintext) == header + body


# -- header format ---------------------------------------------------------------------------


def test_read_header_parses_and_stops_at_segment_zero() -> None:
    data = seal(b"abc")
    stream = io.BytesIO(data)
    header = env.read_header(stream)
    assert header == env.Header(WRAPPED, PREFIX, S)
    assert stream.tell() == header.size == HEADER_LEN
    assert header.to_bytes() == data[:HEADER_LEN]
    assert header.segment_wire_size == WIRE


def test_segment_nonce_layout() -> None:
    header = env.Header(WRAPPED, PREFIX, S)
    assert header.segment_nonce(0, False) == PREFIX + bytes.fromhex("0000000000")
    assert header.segment_nonce(0x01020304, True) == PREFIX + bytes.fromhex("0102030401")
    assert header.segment_nonce(env.MAX_SEGMENT_INDEX, True)[7:] == bytes.fromhex("ffffffff01")
    for bad in (-1, env.MAX_SEGMENT_INDEX + 1):
        with pytest.raises(env.EnvelopeError):
            header.segment_nonce(bad, False)


def test_header_aad_binds_context() -> None:
    header = env.Header(WRAPPED, PREFIX, S)
    assert header.aad(CONTEXT) == header.to_bytes() + ctx.encode(CONTEXT)
    assert header.aad(None) == header.to_bytes() + b"\x00\x00"
    with pytest.raises(env.EnvelopeError):
        header.aad({"k": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"wrapped_dek": b""},
        {"wrapped_dek": b"x" * 8193},
        {"wrapped_dek": "text"},
        {"nonce_prefix": b"123456"},
        {"nonce_prefix": b"12345678"},
        {"segment_size": 4095},
        {"segment_size": 16 * 1024 * 1024 + 1},
        {"segment_size": True},
        {"segment_size": 4096.0},
    ],
)
def test_header_rejects_out_of_range_fields(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"wrapped_dek": WRAPPED, "nonce_prefix": PREFIX, "segment_size": S}
    fields.update(kwargs)
    with pytest.raises(env.EnvelopeError):
        env.Header(**fields)


def test_header_limits_are_inclusive() -> None:
    for header in (
        env.Header(b"x", PREFIX, 4096),
        env.Header(b"x" * 8192, PREFIX, 16 * 1024 * 1024),
    ):
        assert env.read_header(io.BytesIO(header.to_bytes())) == header


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


@pytest.mark.parametrize(
    "make",
    [
        lambda d: b"",
        lambda d: b"KMS",
        lambda d: _patched(d, 0, b"KMSW"),
        lambda d: _patched(d, 4, b"\x02"),
        lambda d: _patched(d, 4, b"\x00"),
        lambda d: _patched(d, 5, struct.pack(">I", 4095)),
        lambda d: _patched(d, 5, struct.pack(">I", 16 * 1024 * 1024 + 1)),
        lambda d: _patched(d, 5, struct.pack(">I", 0xFFFFFFFF)),
        lambda d: _patched(d, 9, b"\x00\x00"),
        lambda d: _patched(d, 9, struct.pack(">H", 8193)),
        lambda d: _patched(d, 9, b"\xff\xff"),
        lambda d: d[:10],
        lambda d: d[: HEADER_LEN - 1],
    ],
)
def test_read_header_rejects_malformed(make: Callable[[bytes], bytes]) -> None:
    with pytest.raises(env.EnvelopeError):
        env.read_header(io.BytesIO(make(seal(b"abc"))))


def test_read_header_rejects_text_stream() -> None:
    with pytest.raises(env.EnvelopeError):
        env.read_header(io.StringIO("KMSE"))  # type: ignore[arg-type]


# -- the corruption checklist ----------------------------------------------------------------

THREE = pattern(2 * S + 100)  # segments: full, full, final of 100 bytes


def _flip(data: bytes, offset: int) -> bytes:
    return _patched(data, offset, bytes([data[offset] ^ 0x01]))


def _swap_first_two(data: bytes) -> bytes:
    first = data[HEADER_LEN : HEADER_LEN + WIRE]
    second = data[HEADER_LEN + WIRE : HEADER_LEN + 2 * WIRE]
    return data[:HEADER_LEN] + second + first + data[HEADER_LEN + 2 * WIRE :]


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "flip last byte": lambda d: _flip(d, len(d) - 1),
    "flip first ciphertext byte": lambda d: _flip(d, HEADER_LEN),
    "flip byte in middle segment": lambda d: _flip(d, HEADER_LEN + WIRE + 100),
    "flip wrapped DEK byte": lambda d: _flip(d, 11 + 5),
    "flip magic": lambda d: _flip(d, 0),
    "flip version": lambda d: _flip(d, 4),
    "flip segment size": lambda d: _flip(d, 7),
    "flip nonce prefix": lambda d: _flip(d, HEADER_LEN - 1),
    "truncate one byte": lambda d: d[:-1],
    "truncate at boundary (drop final segment)": lambda d: d[: HEADER_LEN + 2 * WIRE],
    "truncate to one segment": lambda d: d[: HEADER_LEN + WIRE],
    "truncate to header": lambda d: d[:HEADER_LEN],
    "truncate inside header": lambda d: d[: HEADER_LEN - 3],
    "truncate inside tag of final segment": lambda d: d[: HEADER_LEN + 2 * WIRE + 10],
    "append a byte": lambda d: d + b"\x00",
    "append a tag-sized block": lambda d: d + bytes(16),
    "append a full segment": lambda d: d + d[HEADER_LEN : HEADER_LEN + WIRE],
    "duplicate a segment": lambda d: d[: HEADER_LEN + WIRE] + d[HEADER_LEN:],
    "drop the first segment": lambda d: d[:HEADER_LEN] + d[HEADER_LEN + WIRE :],
    "swap two segments": _swap_first_two,
    "W zero": lambda d: _patched(d, 9, b"\x00\x00"),
    "W too large": lambda d: _patched(d, 9, b"\xff\xff"),
    "W one past the limit": lambda d: _patched(d, 9, struct.pack(">H", 8193)),
    "W one too long but in range": lambda d: _patched(d, 9, struct.pack(">H", len(WRAPPED) + 1)),
    "W one too short": lambda d: _patched(d, 9, struct.pack(">H", len(WRAPPED) - 1)),
    "segment size oversized": lambda d: _patched(d, 5, struct.pack(">I", 16 * 1024 * 1024 + 1)),
    "segment size undersized": lambda d: _patched(d, 5, struct.pack(">I", 4095)),
    "segment size changed but valid": lambda d: _patched(d, 5, struct.pack(">I", 2 * S)),
    "unknown version": lambda d: _patched(d, 4, b"\x02"),
    "empty input": lambda d: b"",
    "segments without header": lambda d: d[HEADER_LEN:],
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_is_detected(name: str) -> None:
    data = seal(THREE)
    assert open_(data) == THREE
    assert_fails(CORRUPTIONS[name](data))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_detected_even_if_unwrap_ignores_wrapped_bytes(name: str) -> None:
    """The header is authenticated by the segments, not only by the server's unwrap."""
    assert_fails(CORRUPTIONS[name](seal(THREE)), unwrap=lambda w: DEK)


def test_truncation_at_boundary_of_exact_multiple() -> None:
    data = seal(pattern(2 * S))  # two full segments, the second one final
    assert len(data) == HEADER_LEN + 2 * WIRE
    assert_fails(data[: HEADER_LEN + WIRE])


def test_every_single_byte_flip_is_detected() -> None:
    data = seal(pattern(S + 3))
    for offset in range(len(data)):
        assert_fails(_flip(data, offset), unwrap=lambda w: DEK)


@pytest.mark.parametrize(
    "context",
    [None, {}, {"tenant": "43", "purpose": "kat"}, {"tenant": "42"}, {**CONTEXT, "x": ""}],
)
def test_wrong_context(context: dict[str, str] | None) -> None:
    assert_fails(seal(THREE), context)


def test_wrong_dek() -> None:
    assert_fails(seal(THREE), unwrap=fake_unwrap(OTHER_DEK))


@pytest.mark.parametrize("bad", [DEK[:16], DEK + b"\x00", b"", "not bytes"])
def test_unusable_dek_from_unwrap(bad: Any) -> None:
    assert_fails(seal(b"abc"), unwrap=lambda w: bad)


def test_non_canonical_empty_final_segment_is_rejected() -> None:
    """Even an authentic envelope that ends in an extra empty segment is refused: each
    plaintext has exactly one encoding."""
    header = env.Header(WRAPPED, PREFIX, S)
    aad, aead = header.aad(CONTEXT), AESGCM(DEK)
    forged = (
        header.to_bytes()
        + aead.encrypt(header.segment_nonce(0, False), pattern(S), aad)
        + aead.encrypt(header.segment_nonce(1, True), b"", aad)
    )
    assert_fails(forged)


def test_unwrap_client_error_propagates_unchanged() -> None:
    refused = KmsClientError("access_denied", "no grant", status=403, request_id="r-1")

    def unwrap(wrapped: bytes) -> bytes:
        raise refused

    with pytest.raises(KmsClientError) as info:
        open_(seal(b"abc"), unwrap=unwrap)
    assert info.value is refused


def test_unwrap_not_called_without_any_segment() -> None:
    calls: list[bytes] = []

    def unwrap(wrapped: bytes) -> bytes:
        calls.append(wrapped)
        return DEK

    assert_fails(seal(b"abc")[:HEADER_LEN], unwrap=unwrap)
    assert calls == []


def test_failure_never_mentions_the_dek() -> None:
    err = assert_fails(seal(THREE), {"tenant": "other"})
    for text in (str(err), repr(err), err.message):
        assert DEK.hex() not in text and repr(DEK) not in text


# -- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dek": DEK[:16]},
        {"dek": DEK + b"\x00"},
        {"dek": DEK.hex()},
        {"wrapped_dek": b""},
        {"wrapped_dek": b"x" * 8193},
        {"segment_size": 4095},
        {"segment_size": 16 * 1024 * 1024 + 1},
        {"nonce_prefix": b"short"},
        {"context": {"": "empty key"}},
        {"context": {"k": 1}},
        {"context": ["not", "a", "map"]},
    ],
)
def test_seal_stream_rejects_bad_arguments_before_writing(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "dek": DEK,
        "wrapped_dek": WRAPPED,
        "context": CONTEXT,
        "segment_size": S,
        "nonce_prefix": PREFIX,
    }
    args.update(kwargs)
    out = io.BytesIO()
    with pytest.raises(KmsClientError) as info:
        seal_stream(
            args["dek"],
            args["wrapped_dek"],
            io.BytesIO(b"data"),
            out,
            args["context"],
            segment_size=args["segment_size"],
            nonce_prefix=args["nonce_prefix"],
        )
    assert info.value.code == "invalid_request"
    assert out.getvalue() == b""
    assert DEK.hex() not in str(info.value)


def test_seal_stream_rejects_text_source() -> None:
    with pytest.raises(KmsClientError) as info:
        seal_stream(DEK, WRAPPED, io.StringIO("text"), io.BytesIO())  # type: ignore[arg-type]
    assert info.value.code == "invalid_request"


def test_open_stream_rejects_invalid_context_as_bad_request() -> None:
    with pytest.raises(KmsClientError) as info:
        open_(seal(b"abc"), {"k": 1})  # type: ignore[dict-item]
    assert info.value.code == "invalid_request"


# -- property --------------------------------------------------------------------------------

contexts = st.dictionaries(st.text(min_size=1, max_size=16), st.text(max_size=32), max_size=5)


@settings(max_examples=60, deadline=None, database=None)
@given(
    size=st.integers(min_value=0, max_value=4 * S + 17),
    segment_size=st.sampled_from([4096, 4097, 8192]),
    context=contexts,
    other=contexts,
)
def test_round_trip_property(
    size: int, segment_size: int, context: dict[str, str], other: dict[str, str]
) -> None:
    plaintext = os.urandom(size)
    data = seal(plaintext, context, segment_size=segment_size, prefix=None)
    assert open_(data, context) == plaintext
    if other != context:
        assert_fails(data, other)


# -- bytes and files through a client --------------------------------------------------------


class StubClient:
    """Stands in for KmsClient: one fixed data key, unwrapped only under its context."""

    def __init__(self, plaintext: bytes | None = DEK, ciphertext: bytes = WRAPPED) -> None:
        self.plaintext, self.ciphertext = plaintext, ciphertext
        self.calls: list[tuple[str, Any, Any]] = []

    def __repr__(self) -> str:
        return "StubClient()"

    def datakey(self, key: str, context: Mapping[str, str] | None = None) -> DataKey:
        self.calls.append(("datakey", key, dict(context or {})))
        return DataKey("k-1", 1, self.ciphertext, self.plaintext)

    def decrypt(self, ciphertext: bytes, context: Mapping[str, str] | None = None) -> bytes:
        self.calls.append(("decrypt", ciphertext, dict(context or {})))
        if ciphertext != WRAPPED or dict(context or {}) != CONTEXT:
            raise KmsClientError("decryption_failed", "the ciphertext could not be decrypted")
        return DEK


def test_bytes_round_trip_through_client() -> None:
    client = StubClient()
    blob = encrypt_bytes(client, "alias/patients", b"record", CONTEXT)
    assert client.calls == [("datakey", "alias/patients", CONTEXT)]
    assert env.read_header(io.BytesIO(blob)).wrapped_dek == WRAPPED
    assert decrypt_bytes(client, blob, CONTEXT) == b"record"
    assert client.calls[1] == ("decrypt", WRAPPED, CONTEXT)
    with pytest.raises(KmsClientError) as info:
        decrypt_bytes(client, blob, {"tenant": "43"})
    assert info.value.code == "decryption_failed"


@pytest.mark.parametrize(
    "call",
    [
        lambda c: encrypt_bytes(c, "k", "text"),  # type: ignore[arg-type]
        lambda c: encrypt_bytes(c, "", b"x"),
        lambda c: encrypt_bytes(c, "k", b"x", {"k": 1}),  # type: ignore[dict-item]
        lambda c: decrypt_bytes(c, "text"),  # type: ignore[arg-type]
        lambda c: decrypt_bytes(c, b"x", {"": "v"}),
    ],
)
def test_bytes_api_rejects_bad_arguments_without_calling_server(call: Any) -> None:
    client = StubClient()
    with pytest.raises(KmsClientError) as info:
        call(client)
    assert info.value.code == "invalid_request"
    assert client.calls == []


@pytest.mark.parametrize(
    "client",
    [StubClient(plaintext=None), StubClient(plaintext=DEK[:16]), StubClient(ciphertext=b"")],
)
def test_unusable_data_key_is_bad_response(client: StubClient) -> None:
    with pytest.raises(KmsClientError) as info:
        encrypt_bytes(client, "k", b"x")
    assert info.value.code == "bad_response"


def test_file_round_trip(tmp_path: Path) -> None:
    plaintext = os.urandom(3 * 65536 + 11)
    (tmp_path / "plain").write_bytes(plaintext)
    client = StubClient()
    encrypt_file(client, "k", tmp_path / "plain", tmp_path / "sealed", CONTEXT)
    decrypt_file(client, str(tmp_path / "sealed"), str(tmp_path / "opened"), CONTEXT)
    assert (tmp_path / "opened").read_bytes() == plaintext
    assert decrypt_bytes(client, (tmp_path / "sealed").read_bytes(), CONTEXT) == plaintext
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opened", "plain", "sealed"]
    assert (tmp_path / "opened").stat().st_mode & 0o077 == 0


def test_failed_decrypt_file_leaves_nothing(tmp_path: Path) -> None:
    client = StubClient()
    (tmp_path / "sealed").write_bytes(seal(THREE)[:-1])
    with pytest.raises(KmsClientError) as info:
        decrypt_file(client, tmp_path / "sealed", tmp_path / "opened", CONTEXT)
    assert info.value.code == "decryption_failed"
    assert [p.name for p in tmp_path.iterdir()] == ["sealed"]


def test_failed_decrypt_file_keeps_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "sealed").write_bytes(seal(THREE))
    (tmp_path / "opened").write_bytes(b"previous")
    with pytest.raises(KmsClientError) as info:  # the server refuses this context
        decrypt_file(StubClient(), tmp_path / "sealed", tmp_path / "opened", {"tenant": "x"})
    assert info.value.code == "decryption_failed"
    assert (tmp_path / "opened").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opened", "sealed"]


def test_missing_source_is_io_error(tmp_path: Path) -> None:
    client = StubClient()
    calls: list[Callable[[], None]] = [
        lambda: encrypt_file(client, "k", tmp_path / "nope", tmp_path / "out"),
        lambda: decrypt_file(client, tmp_path / "nope", tmp_path / "out"),
    ]
    for call in calls:
        with pytest.raises(KmsClientError) as info:
            call()
        assert info.value.code == "io_error"
    assert client.calls == []
    assert list(tmp_path.iterdir()) == []


def test_destination_that_is_a_directory_leaves_no_temp(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"data")
    (tmp_path / "dir").mkdir()
    with pytest.raises(KmsClientError) as info:
        encrypt_file(StubClient(), "k", tmp_path / "plain", tmp_path / "dir")
    assert info.value.code == "io_error"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "plain"]
