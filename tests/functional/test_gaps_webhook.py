"""Issue 16, gap 5: the data owner's webhook.

The secret file is checked like the HSM PIN file: readable by its owner only, or the
server does not start. A notification counts as delivered (and an approved case starts its
waiting period) only when the receiver answers 2xx with ``X-KMS-Ack``, an HMAC under the
shared secret of what it received: a 2xx from whatever else answers at the URL proves
nothing and is retried. Real SoftHSM, a real HTTP receiver, real Ed25519 approvals."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms import config
from kms.services.notify import acknowledgement, signature
from tests.functional.test_escrow import World, world  # noqa: F401 (fixture)
from tests.helpers import SECRET, Receiver


def _env(data_dir: Path, secret: Path) -> dict[str, str]:
    return {
        "KMS_DATA_DIR": str(data_dir),
        "KMS_ESCROW_WEBHOOK_URL": "http://127.0.0.1:9/kms",
        "KMS_ESCROW_WEBHOOK_SECRET_FILE": str(secret),
    }


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606], ids=oct)
def test_a_secret_file_others_can_read_stops_the_start(
    data_dir: Path, tmp_path: Path, mode: int
) -> None:
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET)
    secret.chmod(mode)
    with pytest.raises(config.ConfigError, match="readable by its owner only"):
        config.from_env(_env(data_dir, secret))


def test_an_owner_only_secret_file_is_read(data_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET + b"\n")
    for mode in (0o600, 0o400):
        secret.chmod(mode)
        assert config.from_env(_env(data_dir, secret)).escrow_webhook_secret == SECRET


def test_the_acknowledgement_is_bound_to_the_delivery() -> None:
    body = b'{"event": "case_approved", "notification_id": 7}'
    ack = acknowledgement(SECRET, "1795865000", body)
    assert ack.startswith("v1=") and len(ack) == 3 + 64
    assert ack != signature(SECRET, "1795865000", body)  # an echo of the request is not one
    assert ack != acknowledgement(SECRET, "1795865001", body)
    assert ack != acknowledgement(SECRET, "1795865000", body.replace(b"7", b"8"))
    assert ack != acknowledgement(b"another-secret-of-16-bytes", "1795865000", body)


def _approved(world: World) -> str:  # noqa: F811
    cid = world.file()["case_id"]
    world.decide(cid, "kh-officer")
    assert world.decide(cid, "dpo").json["state"] == "approved"
    return cid


def _approval_note(world: World, cid: str) -> dict[str, object]:  # noqa: F811
    (note,) = [n for n in world.case(cid)["notifications"] if n["event"] == "case_approved"]
    return note


@pytest.mark.parametrize("ack", ["none", "wrong"])
def test_a_2xx_without_a_valid_acknowledgement_starts_no_waiting_period(
    world: World,  # noqa: F811
    ack: str,
) -> None:
    receiver: Receiver = world.receiver
    receiver.ack = ack  # answers 200, but cannot (or does not) prove it holds the secret
    cid = _approved(world)
    world.deliver()
    assert any(a["event"] == "case_approved" for a in receiver.accepted)  # it did answer 200
    note = _approval_note(world, cid)
    assert note["state"] == "pending" and note["attempts"] == 1
    assert "X-KMS-Ack" in str(note["last_error"])
    case = world.case(cid)
    assert case["state"] == "approved" and case["active_from"] is None
    world.clock.advance(7 * 3600)  # far past the waiting period: still not active
    assert world.case(cid)["state"] == "approved"
    world.refused(world.unwrap(cid))
    failed = [
        r for r in world.api.audit() if r["operation"] == "webhook_delivery" and r["case_id"] == cid
    ]
    assert failed and all(r["outcome"] == "delivery_failed" for r in failed)
    # the data owner's receiver proper: the retry is delivered and the clock starts
    receiver.ack = "valid"
    world.deliver()
    assert _approval_note(world, cid)["state"] == "delivered"
    assert world.case(cid)["active_from"] is not None
    world.refused(world.unwrap(cid))  # the waiting period runs from now
    world.clock.advance(3601)
    assert world.case(cid)["state"] == "active"
    assert world.unwrap(cid).status_code == 200
