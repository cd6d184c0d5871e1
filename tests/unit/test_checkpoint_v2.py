"""Checkpoint format 2 (the sealed state signed with the chain head) beside format 1:
frozen vectors of both versions' signed bytes and of a signature by a fixed key, and the
strict shape of each version (kms/formats/checkpoint.py)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kms.formats import checkpoint as cpfmt

# A fixed key (the scalar is b"kms-checkpoint-vec-1"), its public key and two checkpoints
# it signed once: these signatures must verify for ever.
PEM = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE78TiTiIbDkYphyAeTnsFouzRkTPF
fEpqEjlPErwHCB7s/sqgSh0trH3eEnbSv5duulrQ8wSsFIlSd/hk7gvKBg==
-----END PUBLIC KEY-----
"""
FINGERPRINT = "30051b6a9766afe61abb4af6544b5eac7b842e836860534c6419d87db006ffa8"
V1: dict[str, Any] = {
    "v": 1,
    "seq": 12,
    "prev_seq": 7,
    "record_hash": "ab" * 32,
    "time": "2026-11-01T09:00:00.000Z",
    "key_sha256": FINGERPRINT,
    "signature": "MEUCIQD3hw6qZ720lPJ7R/nH03HcgjsEPPdjVHpRDEAQWUkwHwIgYGIjNlHLJsGfPU+/"
    "PoMtiheo2c1YO1qHDcyLivmRxnM=",
}
V2: dict[str, Any] = {
    **V1,
    "v": 2,
    "state_seq": 5,
    "state_sha256": "cd" * 32,
    "signature": "MEUCIHIPKW/J1FBraph9hRfGiGJXSbg/oG08lIUAtSzQz5vAAiEAp28pHHf8rlxhMpe38L1R0s"
    "kGoOkyrq1k6R5xm1d9P+4=",
}
KEY = cpfmt.load_public_key(PEM)


def test_the_vectors_are_frozen() -> None:
    assert cpfmt.key_fingerprint(PEM) == FINGERPRINT
    assert cpfmt.signed_bytes(V1) == (
        b'KMS-CHECKPOINT-1\n{"key_sha256":"' + FINGERPRINT.encode() + b'","prev_seq":7,'
        b'"record_hash":"' + b"ab" * 32 + b'","seq":12,"time":"2026-11-01T09:00:00.000Z","v":1}'
    )
    assert cpfmt.signed_bytes(V2) == (
        b'KMS-CHECKPOINT-2\n{"key_sha256":"' + FINGERPRINT.encode() + b'","prev_seq":7,'
        b'"record_hash":"'
        + b"ab" * 32
        + b'","seq":12,"state_seq":5,"state_sha256":"'
        + b"cd" * 32
        + b'","time":"2026-11-01T09:00:00.000Z","v":2}'
    )
    assert cpfmt.digest(V1).hex() == (
        "c420b96c6c6d6f8479fb3aa2857b253deb39a23f6c5534875c04577e840c6538"
    )
    assert cpfmt.digest(V2).hex() == (
        "eed736fd7be3fc01322abe14f9a04169ecb3bd566abe86df09191b299e529d9c"
    )
    assert cpfmt.digest(V2) == hashlib.sha256(cpfmt.signed_bytes(V2)).digest()


@pytest.mark.parametrize("cp", [V1, V2], ids=["format 1", "format 2"])
def test_signatures_made_once_still_verify(cp: dict[str, Any]) -> None:
    cpfmt.verify(cp, KEY)
    cpfmt.verify({"type": "checkpoint", **cp}, KEY)  # as a bundle line holds it


@pytest.mark.parametrize(
    "changes",
    [
        {"state_seq": 4},  # the state a checkpoint signed cannot be moved back
        {"state_seq": 6},
        {"state_sha256": "ce" + "cd" * 31},
        {"seq": 13},
        {"record_hash": "ac" + "ab" * 31},
    ],
)
def test_a_changed_signed_field_of_format_2_fails(changes: dict[str, Any]) -> None:
    with pytest.raises(cpfmt.CheckpointError, match="signature does not verify"):
        cpfmt.verify({**V2, **changes}, KEY)


def test_the_versions_sign_different_bytes() -> None:
    """A format 2 checkpoint stripped of its state (to pass as format 1) or a format 1
    signature moved onto a format 2 body does not verify: the prefix names the version."""
    stripped = {k: v for k, v in V2.items() if not k.startswith("state_")} | {"v": 1}
    with pytest.raises(cpfmt.CheckpointError, match="signature does not verify"):
        cpfmt.verify(stripped, KEY)
    with pytest.raises(cpfmt.CheckpointError, match="signature does not verify"):
        cpfmt.verify({**V2, "signature": V1["signature"]}, KEY)
    # the same fields under the other prefix are other bytes
    body = {k: v for k, v in V1.items() if k != "signature"}
    assert cpfmt.signed_bytes(body).startswith(b"KMS-CHECKPOINT-1\n")


def test_a_fresh_format_2_signature_verifies() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    body = cpfmt.unsigned(3, 0, "00" * 32, "2026-11-01T09:00:00.000Z", "11" * 32, (0, "22" * 32))
    assert body["v"] == 2 and (body["state_seq"], body["state_sha256"]) == (0, "22" * 32)
    sig = private.sign(cpfmt.signed_bytes(body), ec.ECDSA(hashes.SHA256()))
    cpfmt.verify({**body, "signature": base64.b64encode(sig).decode()}, private.public_key())


def test_unsigned_picks_the_version_by_the_state() -> None:
    v1 = cpfmt.unsigned(12, 7, "ab" * 32, "2026-11-01T09:00:00.000Z", FINGERPRINT)
    assert v1 == {k: v for k, v in V1.items() if k != "signature"}
    v2 = cpfmt.unsigned(12, 7, "ab" * 32, "2026-11-01T09:00:00.000Z", FINGERPRINT, (5, "cd" * 32))
    assert v2 == {k: v for k, v in V2.items() if k != "signature"}
    with pytest.raises(cpfmt.CheckpointError):
        cpfmt.unsigned(12, 7, "ab" * 32, "t", FINGERPRINT, (5, "CD" * 32))


def _without(cp: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in cp.items() if k not in names}


@pytest.mark.parametrize(
    ("cp", "message"),
    [
        ({**V1, "state_seq": 5, "state_sha256": "cd" * 32}, "unexpected fields for format 1"),
        ({**V1, "state_seq": 5}, "unexpected fields for format 1: state_seq"),
        (_without(V2, "state_sha256"), "fields missing: format 2 needs"),
        (_without(V2, "state_seq", "state_sha256"), "fields missing: format 2 needs"),
        (_without(V2, "signature"), "fields missing"),
        ({**V2, "extra": 1}, "unexpected fields for format 2: extra"),
        ({**V2, "v": 3}, "unknown checkpoint format version"),
        ({**V2, "v": "2"}, "unknown checkpoint format version"),
        ({**V2, "v": True}, "unknown checkpoint format version"),
        (_without(V2, "v"), "fields missing: need v"),
        ({**V2, "state_seq": -1}, "state_seq >= 0"),
        ({**V2, "state_seq": True}, "'state_seq' must be int"),
        ({**V2, "state_seq": "5"}, "'state_seq' must be int"),
        ({**V2, "state_seq": 5.0}, "'state_seq' must be int"),
        ({**V2, "state_seq": None}, "'state_seq' must be int"),
        ({**V2, "state_sha256": "CD" * 32}, "'state_sha256' must be 64 lowercase hex"),
        ({**V2, "state_sha256": "cd" * 31}, "'state_sha256' must be 64 lowercase hex"),
        ({**V2, "state_sha256": "cd" * 32 + "\n"}, "'state_sha256' must be 64 lowercase hex"),
        ({**V2, "state_sha256": "zz" * 32}, "'state_sha256' must be 64 lowercase hex"),
        ({**V2, "state_sha256": None}, "'state_sha256' must be str"),
        ({**V2, "prev_seq": 12}, "0 <= prev_seq < seq"),
        ({**V1, "seq": "12"}, "'seq' must be int"),
        ([], "fields missing"),
    ],
)
def test_each_version_has_exactly_its_fields(cp: Any, message: str) -> None:
    with pytest.raises(cpfmt.CheckpointError, match=message):
        cpfmt.verify(cp, KEY)


def test_format_1_checks_are_unchanged() -> None:
    """Format 1 is checked as before: no new constraint on its fields (a record_hash that
    is not hex was never refused by the shape check, only by the signature)."""
    cpfmt.check_shape({**V1, "record_hash": "not hex"})
    with pytest.raises(cpfmt.CheckpointError, match="signature does not verify"):
        cpfmt.verify({**V1, "record_hash": "not hex"}, KEY)
