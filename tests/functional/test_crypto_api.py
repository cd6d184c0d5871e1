"""Data-key operations through the Flask app against the real SoftHSM token."""

from __future__ import annotations

import pytest

from kms.formats import blob as blobfmt
from tests.helpers import Api, b64, unb64


@pytest.fixture
def svc(api: Api) -> dict[str, str]:
    return api.principal("service")


def datakey(api: Api, key: str, svc: dict[str, str], context: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    r = api.call("POST", f"/v1/keys/{key}/datakey", svc, json={"context": context or {}})
    assert r.status_code == 200, r.json
    return r.json


def decrypt(api: Api, svc: dict[str, str], ct: str, context: dict[str, str] | None = None, **kw):  # type: ignore[no-untyped-def]
    return api.call(
        "POST", "/v1/decrypt", svc, json={"ciphertext": ct, "context": context or {}, **kw}
    )


def test_datakey_round_trip_binds_context(api: Api, svc: dict[str, str]) -> None:
    key = api.key("patients", grant=svc)
    dk = datakey(api, "patients", svc, {"tenant": "42"})
    assert dk["key_id"] == key and dk["key_version"] == 1
    assert len(unb64(dk["plaintext"])) == 32
    ok = decrypt(api, svc, dk["ciphertext"], {"tenant": "42"})
    assert ok.status_code == 200 and ok.json["plaintext"] == dk["plaintext"]
    wrong = decrypt(api, svc, dk["ciphertext"], {"tenant": "43"})
    assert wrong.status_code == 400 and wrong.json["error"]["code"] == "decryption_failed"
    assert "plaintext" not in wrong.json


def test_datakey_without_plaintext(api: Api, svc: dict[str, str]) -> None:
    api.key("k", grant=svc)
    r = api.call("POST", "/v1/keys/k/datakey", svc, json={"include_plaintext": False})
    assert r.status_code == 200 and "plaintext" not in r.json
    assert len(unb64(decrypt(api, svc, r.json["ciphertext"]).json["plaintext"])) == 32


def test_encrypt_limits_and_round_trip(api: Api, svc: dict[str, str]) -> None:
    api.key("k", grant=svc)
    for size in (0, 1, 4096):
        r = api.call("POST", "/v1/keys/k/encrypt", svc, json={"plaintext": b64(b"x" * size)})
        assert r.status_code == 200, r.json
        assert unb64(decrypt(api, svc, r.json["ciphertext"]).json["plaintext"]) == b"x" * size
    r = api.call("POST", "/v1/keys/k/encrypt", svc, json={"plaintext": b64(b"x" * 4097)})
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request"


def test_rotation_keeps_old_blobs_decryptable_and_rewrap_moves_them(
    api: Api, svc: dict[str, str]
) -> None:
    api.key("k", grant=svc)
    old = datakey(api, "k", svc, {"a": "b"})
    r = api.call("POST", "/v1/keys/k/rotate", api.admin)
    assert r.status_code == 200 and r.json["current_version"] == 2
    new = datakey(api, "k", svc, {"a": "b"})
    assert new["key_version"] == 2
    for dk in (old, new):
        r = decrypt(api, svc, dk["ciphertext"], {"a": "b"})
        assert r.status_code == 200 and r.json["plaintext"] == dk["plaintext"]
    assert decrypt(api, svc, old["ciphertext"], {"a": "b"}).json["key_version"] == 1
    rw = api.call(
        "POST", "/v1/rewrap", svc, json={"ciphertext": old["ciphertext"], "context": {"a": "b"}}
    )
    assert rw.status_code == 200 and rw.json["key_version"] == 2 and "plaintext" not in rw.json
    again = decrypt(api, svc, rw.json["ciphertext"], {"a": "b"})
    assert again.json["plaintext"] == old["plaintext"] and again.json["key_version"] == 2


def test_rewrap_to_another_key_needs_grant_there(api: Api, svc: dict[str, str]) -> None:
    api.key("src", grant=svc)
    dest = api.key("dest")
    dk = datakey(api, "src", svc)
    body = {"ciphertext": dk["ciphertext"], "destination_key": "dest"}
    assert api.call("POST", "/v1/rewrap", svc, json=body).status_code == 403
    api.call(
        "POST",
        "/v1/keys/dest/grants",
        api.admin,
        json={"principal": svc["X-Name"], "operations": ["rewrap"]},
    )
    r = api.call("POST", "/v1/rewrap", svc, json=body)
    assert r.status_code == 200 and r.json["key_id"] == dest
    assert (
        api.call("POST", "/v1/decrypt", svc, json={"ciphertext": r.json["ciphertext"]}).status_code
        == 403
    )


def test_batches(api: Api, svc: dict[str, str]) -> None:
    api.key("k", grant=svc)
    r = api.call(
        "POST",
        "/v1/keys/k/datakey",
        svc,
        json={"items": [{"context": {"i": str(i)}} for i in range(1000)]},
    )
    assert r.status_code == 200 and len(r.json["results"]) == 1000
    items = [
        {"ciphertext": x["ciphertext"], "context": {"i": str(i)}}
        for i, x in enumerate(r.json["results"][:50])
    ]
    items[7]["context"] = {"i": "wrong"}
    items.append({"ciphertext": b64(b"garbage")})
    d = api.call("POST", "/v1/decrypt", svc, json={"items": items})
    assert d.status_code == 200
    results = d.json["results"]
    assert [i for i, x in enumerate(results) if "error" in x] == [7, 50]
    assert results[0]["plaintext"] == r.json["results"][0]["plaintext"]
    assert results[7]["error"]["code"] == results[50]["error"]["code"] == "decryption_failed"
    e = api.call(
        "POST",
        "/v1/keys/k/encrypt",
        svc,
        json={"items": [{"plaintext": b64(b"a")}, {"plaintext": b64(b"b")}]},
    )
    assert e.status_code == 200 and all("ciphertext" in x for x in e.json["results"])
    rw = api.call(
        "POST",
        "/v1/rewrap",
        svc,
        json={"items": [{"ciphertext": x["ciphertext"]} for x in e.json["results"]]},
    )
    assert rw.status_code == 200 and len(rw.json["results"]) == 2
    before = len(api.audit())
    too_many = api.call("POST", "/v1/keys/k/datakey", svc, json={"items": [{}] * 1001})
    assert too_many.status_code == 400
    bad_item = api.call("POST", "/v1/decrypt", svc, json={"items": [{"ciphertext": "!!"}]})
    assert bad_item.status_code == 400 and "items[0]" in bad_item.json["error"]["message"]
    assert len(api.audit()) == before + 2  # one record per refused request


def test_one_audit_record_per_item(api: Api, svc: dict[str, str]) -> None:
    key = api.key("k", grant=svc)
    before = len(api.audit())
    api.call("POST", "/v1/keys/k/datakey", svc, json={"items": [{"context": {"n": "1"}}, {}]})
    records = api.audit()[before:]
    assert [(r["operation"], r["key_id"], r["outcome"]) for r in records] == [
        ("datakey", key, "ok")
    ] * 2
    assert records[0]["context_sha256"] != records[1]["context_sha256"]


def test_key_states_gate_use(api: Api, svc: dict[str, str]) -> None:
    api.key("k", grant=svc)
    dk = datakey(api, "k", svc)
    assert api.call("POST", "/v1/keys/k/disable", api.admin).json["state"] == "disabled"
    for r in (
        api.call("POST", "/v1/keys/k/datakey", svc, json={}),
        decrypt(api, svc, dk["ciphertext"]),
        api.call("POST", "/v1/keys/k/rotate", api.admin),
    ):
        assert r.status_code == 409 and r.json["error"]["code"] == "key_state"
    assert api.call("POST", "/v1/keys/k/enable", api.admin, json={}).json["state"] == "enabled"
    assert decrypt(api, svc, dk["ciphertext"]).status_code == 200
    sched = api.call("POST", "/v1/keys/k/schedule-deletion", api.admin, json={"pending_days": 7})
    assert (
        sched.status_code == 200
        and sched.json["state"] == "pending_deletion"
        and sched.json["deletion_date"]
    )
    assert decrypt(api, svc, dk["ciphertext"]).status_code == 409
    assert api.call("POST", "/v1/keys/k/enable", api.admin).status_code == 409
    for days in (6, 31):
        assert (
            api.call(
                "POST", "/v1/keys/k/schedule-deletion", api.admin, json={"pending_days": days}
            ).status_code
            == 400
        )
    cancel = api.call("POST", "/v1/keys/k/cancel-deletion", api.admin)
    assert cancel.json["state"] == "disabled" and cancel.json["deletion_date"] is None
    assert api.call("POST", "/v1/keys/k/cancel-deletion", api.admin).status_code == 409


def test_justifications(api: Api, svc: dict[str, str]) -> None:
    api.key("k", grant=svc)
    ct = datakey(api, "k", svc)["ciphertext"]
    assert decrypt(api, svc, ct, justification="service_processing").status_code == 200
    assert decrypt(api, svc, ct, justification="made_up").status_code == 400
    refused = decrypt(api, svc, ct, justification="legal_request")
    assert refused.status_code == 403 and "plaintext" not in refused.json
    assert api.audit()[-1]["justification"] == "legal_request"


def test_grant_is_needed_and_scoped(api: Api, svc: dict[str, str]) -> None:
    api.key("mine", grant=svc, ops=("datakey",))
    api.key("other")
    assert api.call("POST", "/v1/keys/other/datakey", svc, json={}).status_code == 403
    ct = datakey(api, "mine", svc)["ciphertext"]
    r = decrypt(api, svc, ct)  # datakey only: no decrypt grant
    assert r.status_code == 403 and r.json["error"]["code"] == "forbidden"
    # a key that does not exist is answered as a key without a grant (tests/functional/
    # test_gaps_existence.py holds the whole rule)
    assert api.call("POST", "/v1/keys/nope/datakey", svc, json={}).status_code == 403
    other_admin = api.principal("admin")
    r = api.call(
        "POST",
        "/v1/keys/mine/grants",
        api.admin,
        json={"principal": other_admin["X-Name"], "operations": ["decrypt"]},
    )
    assert r.status_code == 400  # only services can be granted
    r = api.call(
        "POST",
        "/v1/keys/mine/grants",
        api.admin,
        json={"principal": "ghost", "operations": ["decrypt"]},
    )
    assert r.status_code == 404
    r = api.call(
        "POST",
        "/v1/keys/mine/grants",
        api.admin,
        json={"principal": svc["X-Name"], "operations": ["sign"]},
    )
    assert r.status_code == 400
    revoke = api.call(
        "POST",
        "/v1/keys/mine/grants",
        api.admin,
        json={"principal": svc["X-Name"], "operations": []},
    )
    assert revoke.status_code == 200 and revoke.json["operations"] == []
    assert api.call("POST", "/v1/keys/mine/datakey", svc, json={}).status_code == 403


# -- the corruption checklist (docs/development.md, "Habits") -------------------------------


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_corruption_checklist_gives_one_error(api: Api, svc: dict[str, str]) -> None:
    key = api.key("k", grant=svc)
    other = api.key("other", grant=svc)
    raw = unb64(datakey(api, "k", svc, {"tenant": "1"})["ciphertext"])
    header_end = 6 + len(key) + 4
    other_header = raw[:5] + bytes([len(other)]) + other.encode() + raw[6 + len(key) :]
    cases = {
        "flipped last byte": _flip(raw, len(raw) - 1),
        "flipped byte in the wrapped key": _flip(raw, header_end + 12 + 5),
        "flipped IV byte": _flip(raw, header_end + 1),
        "flipped key version": _flip(raw, header_end - 2),
        "truncated": raw[:-1],
        "truncated to the header": raw[:header_end],
        "bad length prefix": raw[:5] + bytes([len(key) + 3]) + raw[6:],
        "zero length prefix": raw[:5] + b"\x00" + raw[6:],
        "wrong key": other_header,
        "bad magic": b"XXXX" + raw[4:],
        "unknown format": raw[:4] + b"\x09" + raw[5:],
    }
    bodies = []
    for name, blob in cases.items():
        r = decrypt(api, svc, b64(blob), {"tenant": "1"})
        assert r.status_code == 400, name
        bodies.append((r.json["error"]["code"], r.json["error"]["message"]))
    wrong_context = decrypt(api, svc, b64(raw), {"tenant": "2"})
    bodies.append((wrong_context.json["error"]["code"], wrong_context.json["error"]["message"]))
    assert set(bodies) == {("decryption_failed", "the ciphertext could not be decrypted")}
    # The precise reasons are in the audit trail only.
    details = [r["detail"] for r in api.audit() if r["outcome"] == "decryption_failed"]
    assert any("authentication failed" in d for d in details)
    assert any("malformed blob" in d for d in details)
    assert any("unknown key version" in d for d in details)
    oversized = decrypt(api, svc, b64(raw + b"\x00" * blobfmt.MAX_BLOB_BYTES))
    assert oversized.status_code == 400 and oversized.json["error"]["code"] == "invalid_request"
    assert decrypt(api, svc, b64(raw), {"tenant": "1"}).status_code == 200
