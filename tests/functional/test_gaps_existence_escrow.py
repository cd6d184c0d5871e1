"""Issue 16, gap 1, under an escrow case: a requester unwraps only blobs of the keys its
case names. A blob of a key outside the scope gets one answer whether that key exists or
not (it used to be 403 for an existing key, 400 for an unknown one); the audit record
keeps the reason. Real SoftHSM, real Ed25519 approvals, a real webhook receiver."""

from __future__ import annotations

import base64
import uuid

from tests.functional.test_escrow import World, world  # noqa: F401 (fixture)
from tests.helpers import b64


def _active_case(world: World) -> str:  # noqa: F811
    cid = world.file()["case_id"]
    world.decide(cid, "kh-officer")
    world.decide(cid, "dpo")
    world.deliver()
    world.clock.advance(3601)
    assert world.case(cid)["state"] == "active"
    return cid


def test_a_requester_learns_nothing_about_keys_outside_its_case(world: World) -> None:  # noqa: F811
    cid = _active_case(world)
    api = world.api
    other = api.call(
        "POST", "/v1/keys/other/datakey", world.svc, json={"context": {"patient": "p0"}}
    )
    assert other.status_code == 200, other.json
    raw = base64.b64decode(other.json["ciphertext"])
    other_id = api.call("GET", "/v1/keys/other", api.admin).json["key_id"]
    unknown = raw.replace(other_id.encode(), str(uuid.uuid4()).encode())
    answers, ids = [], []
    for blob in (raw, unknown):
        r = world.unwrap(cid, ciphertext=b64(blob))
        answers.append((r.status_code, r.json["error"]["code"], r.json["error"]["message"]))
        ids.append(r.headers["X-Request-Id"])
    assert answers[0] == answers[1], answers
    assert answers[0] == (403, "forbidden", "the blob's key is outside the case scope")
    details = {r["request_id"]: r["detail"] for r in api.audit()}
    assert details[ids[0]] == "key out of scope"
    assert details[ids[1]] == "key out of scope; blob names an unknown key"
    assert world.case(cid)["unwraps_used"] == 0
    assert world.unwrap(cid).status_code == 200  # the case itself still works
