"""Keyed context hashes (issue 15, attack 5) and the auditor's query by context, against
the real SoftHSM token and a real SQLite database."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kms import config
from kms.app import create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from kms.errors import ClientError, HsmUnavailable
from kms.formats import context as ctxfmt
from kms.services.audit_events import Caller
from kms.services.context_hash import MEMO_MAX_BYTES, ContextHasher
from kms.services.crypto import RewrapRequest
from kms.services.model import AuditEvent
from tests.helpers import Api, b64, unb64

CRYPTO = ("datakey", "encrypt", "decrypt", "rewrap")


@pytest.fixture
def svc(api: Api) -> dict[str, str]:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    return svc


def keyed(hsm: Pkcs11Hsm, context: dict[str, str]) -> str:
    """The derivation, spelled out: HMAC-SHA256 by the HSM of the prefixed encoding."""
    return hsm.mac(b"KMS-CONTEXT-1\n" + ctxfmt.encode(context)).hex()


def encrypt(api: Api, svc: dict[str, str], context: dict[str, str]) -> str:
    r = api.call(
        "POST", "/v1/keys/k/encrypt", svc, json={"plaintext": b64(b"chart"), "context": context}
    )
    assert r.status_code == 200, r.json
    return str(r.json["ciphertext"])


def decrypt(api: Api, svc: dict[str, str], blob: str, context: dict[str, str]) -> Any:
    return api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob, "context": context})


def by_context(api: Api, who: dict[str, str], body: Any) -> Any:
    return api.call("POST", "/v1/audit/context", who, json=body)


def test_attack_5_guessing_contexts_finds_no_record(
    api: Api, svc: dict[str, str], hsm: Pkcs11Hsm
) -> None:
    opened = [7, 4242, 199_999]
    for n in opened:
        ctx = {"patient": f"p-{n}"}
        blob = encrypt(api, svc, ctx)
        assert decrypt(api, svc, blob, ctx).status_code == 200
        dk = api.call("POST", "/v1/keys/k/datakey", svc, json={"context": ctx})
        assert dk.status_code == 200
    records = [r for r in api.audit() if r["operation"] in CRYPTO]
    assert len(records) == 3 * len(opened)
    recorded = {r["context_sha256"] for r in records}
    # the attack: hash every candidate context as the old records did, look for matches
    candidates = {
        hashlib.sha256(ctxfmt.encode({"patient": f"p-{n}"})).hexdigest(): n for n in range(200_000)
    }
    assert [candidates[h] for h in recorded if h in candidates] == []
    # what is recorded is the keyed hash: equal contexts equal, different ones differ
    by_patient = {n: keyed(hsm, {"patient": f"p-{n}"}) for n in opened}
    assert recorded == set(by_patient.values()) and len(recorded) == len(opened)
    for i, n in enumerate(opened):
        assert {r["context_sha256"] for r in records[3 * i : 3 * i + 3]} == {by_patient[n]}


def test_a_context_hash_is_domain_separated_from_row_seals(hsm: Pkcs11Hsm) -> None:
    ctx = {"patient": "p-1"}
    assert keyed(hsm, ctx) != hsm.mac(ctxfmt.encode(ctx)).hex()
    assert keyed(hsm, ctx) == ContextHasher(hsm).digest(ctx)
    assert ContextHasher(hsm).digest({}) == keyed(hsm, {})  # the empty context has one too


def test_rewrap_to_another_context_names_its_keyed_hash(
    api: Api, svc: dict[str, str], hsm: Pkcs11Hsm, app: Any
) -> None:
    src, dst = {"patient": "p-1"}, {"patient": "p-2"}
    blob = encrypt(api, svc, src)
    services = app.extensions["kms"]  # the AWS face's ReEncrypt, without SigV4 in the way
    principal = services.principals.authenticate(svc["Authorization"].split()[1])
    item = RewrapRequest(unb64(blob), src, destination_context=dst)
    (done,) = services.crypto.rewrap(Caller("rewrap-1", principal), [item])
    assert not isinstance(done, ClientError), done
    record = api.audit()[-1]
    assert record["operation"] == "rewrap" and record["context_sha256"] == keyed(hsm, src)
    assert record["detail"].endswith(f" context_sha256={keyed(hsm, dst)}")
    assert hashlib.sha256(ctxfmt.encode(dst)).hexdigest() not in record["detail"]


def test_the_auditor_gets_exactly_the_records_of_a_context(
    api: Api, svc: dict[str, str], hsm: Pkcs11Hsm, app: Any
) -> None:
    mine, other = {"patient": "p-1", "ward": "3"}, {"patient": "p-2", "ward": "3"}
    blob = encrypt(api, svc, mine)
    encrypt(api, svc, other)
    assert decrypt(api, svc, blob, mine).status_code == 200
    assert decrypt(api, svc, blob, other).status_code == 400  # refused: recorded with "other"
    assert decrypt(api, svc, blob, dict(reversed(mine.items()))).status_code == 200  # same map
    # a record written before keyed hashes holds the unkeyed SHA-256: it is found too
    legacy = AuditEvent("legacy-1", "svc", "decrypt", context_sha256=ctxfmt.digest(mine))
    app.extensions["kms"].audit.record([legacy])
    everything = api.audit()
    wanted = {keyed(hsm, mine), ctxfmt.digest(mine)}
    expected = [r for r in everything if r["context_sha256"] in wanted]
    assert [r["operation"] for r in expected] == ["encrypt", "decrypt", "decrypt", "decrypt"]

    auditor = api.principal("auditor", "aud")
    r = by_context(api, auditor, {"context": mine})
    assert r.status_code == 200, r.json
    assert r.json["records"] == expected
    # paged like the listing, and filtered like it
    first = by_context(api, auditor, {"context": mine, "limit": 1}).json["records"]
    rest = by_context(api, auditor, {"context": mine, "after": first[0]["seq"]}).json["records"]
    assert first + rest[: len(expected) - 1] == expected
    only = by_context(api, api.admin, {"context": mine, "operation": "encrypt"}).json["records"]
    assert only == expected[:1]
    assert by_context(api, auditor, {"context": {"patient": "p-9"}}).json["records"] == []

    # each query is recorded, with the keyed hash and never the context
    queries = [x for x in api.audit() if x["operation"] == "read_audit_context"]
    assert [q["principal"] for q in queries] == ["aud"] * 3 + ["admin", "aud"]
    assert {q["outcome"] for q in queries} == {"ok"}
    assert [q["context_sha256"] for q in queries[:4]] == [keyed(hsm, mine)] * 4
    assert queries[-1]["context_sha256"] == keyed(hsm, {"patient": "p-9"})
    assert queries[0]["detail"] == f"after=0 found={len(expected)}"
    for record in api.audit():
        assert "p-1" not in str(record) and "p-9" not in str(record)
    # the queries are records of that context too (who looked for it): later asks see them
    again = by_context(api, auditor, {"context": mine}).json["records"]
    assert again == expected + queries[:4]


def test_the_context_query_refuses_other_roles_and_bad_input(api: Api, svc: dict[str, str]) -> None:
    before = len(api.audit())
    for role in ("service", "requester", "custodian"):
        who = svc if role == "service" else api.principal(role)
        r = by_context(api, who, {"context": {"patient": "p-1"}})
        assert r.status_code == 403 and r.json["error"]["code"] == "forbidden", r.json
    refused = [x for x in api.audit()[before:] if x["operation"] != "create_principal"]
    assert [(x["operation"], x["outcome"]) for x in refused] == [
        ("read_audit_context", "forbidden")
    ] * 3
    assert all(x["context_sha256"] is None for x in refused)  # refused before hashing

    auditor = api.principal("auditor")
    bad: list[Any] = [
        {},
        {"context": None},
        {"context": []},
        {"context": "patient=p-1"},
        {"context": {"patient": 1}},
        {"context": {"": "x"}},
        {"context": {"k": "v" * 1025}},
        {"context": {"k" * 257: "v"}},
        {"context": {f"k{i}": "v" for i in range(65)}},
        {"context": {"patient": "p-1"}, "extra": 1},
        {"context": {}, "limit": 0},
        {"context": {}, "limit": 1001},
        {"context": {}, "limit": "10"},
        {"context": {}, "after": -1},
        {"context": {}, "after": True},
        {"context": {}, "key_id": ""},
        {"context": {}, "key_id": "x" * 65},
        {"context": {}, "principal": 7},
        {"context": {}, "until": None},
        {"context": {}, "since": "yesterday"},
        {"context": {}, "operation": "a\u0000b"},
        [{"context": {}}],
        "context",
    ]
    before = len(api.audit())
    for body in bad:
        r = by_context(api, auditor, body)
        assert r.status_code == 400, (body, r.status_code, r.json)
        assert r.json["error"]["code"] == "invalid_request", (body, r.json)
    raw = api.call(
        "POST", "/v1/audit/context", auditor, data=b"{not json", content_type="application/json"
    )
    assert raw.status_code == 400 and raw.json["error"]["code"] == "invalid_request"
    refused = api.audit()[before:]
    assert len(refused) == len(bad) + 1
    assert {(x["operation"], x["outcome"]) for x in refused} == {
        ("read_audit_context", "invalid_request")
    }
    assert api.call("GET", "/v1/audit/context", auditor).status_code == 405


class MacDown:
    """The real HSM, except that its MAC of a context fails as an unreachable HSM does
    (fault injection: row seals and everything else use the real token)."""

    def __init__(self, real: Pkcs11Hsm) -> None:
        self._real = real

    def mac(self, data: bytes) -> bytes:
        if data.startswith(ctxfmt.KEYED_PREFIX):
            raise HsmUnavailable(detail="DeviceError")
        return self._real.mac(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_without_the_hsm_mac_the_operation_is_refused(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, tmp_path: Path
) -> None:
    app = create_app(settings, hsm=MacDown(hsm), storage=storage)  # type: ignore[arg-type]
    token = app.extensions["kms"].principals.bootstrap_admin("admin")
    api = Api(app.test_client(), token)
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    r = api.call("POST", "/v1/keys/k/encrypt", svc, json={"plaintext": b64(b"x"), "context": {}})
    assert r.status_code == 503 and r.json["error"]["code"] == "hsm_unavailable"
    assert "ciphertext" not in r.json and "results" not in r.json
    auditor = api.principal("auditor")
    q = by_context(api, auditor, {"context": {"patient": "p-1"}})
    assert q.status_code == 503 and q.json["error"]["code"] == "hsm_unavailable"
    outcomes = [(x["operation"], x["outcome"]) for x in api.audit()]
    assert outcomes[-3] == ("encrypt", "hsm_unavailable")
    assert outcomes[-1] == ("read_audit_context", "hsm_unavailable")


def test_the_memo_is_bounded_and_never_holds_a_failure(hsm: Pkcs11Hsm) -> None:
    hasher = ContextHasher(hsm, memo_entries=3)
    values = [hasher.digest({"n": str(i)}) for i in range(5)]
    assert hasher.memo_size() == 3
    assert values == [keyed(hsm, {"n": str(i)}) for i in range(5)]
    assert hasher.digest({"n": "0"}) == values[0]  # evicted, computed again, the same
    big = {"k": "v" * (MEMO_MAX_BYTES + 1)}
    size = hasher.memo_size()
    assert hasher.digest(big) == keyed(hsm, big) and hasher.memo_size() == size
    down = ContextHasher(MacDown(hsm))  # type: ignore[arg-type]
    with pytest.raises(HsmUnavailable):
        down.digest({"n": "1"})
    assert down.memo_size() == 0


def test_the_hash_is_computed_once_per_item(api: Api, svc: dict[str, str], app: Any) -> None:
    crypto = app.extensions["kms"].crypto
    calls: list[bytes] = []
    real = crypto._contexts._hsm

    class Counting:
        def mac(self, data: bytes) -> bytes:
            calls.append(data)
            return real.mac(data)

    crypto._contexts = ContextHasher(Counting(), memo_entries=0)  # type: ignore[arg-type]
    items = [{"plaintext": b64(b"x"), "context": {"i": str(i)}} for i in range(4)]
    r = api.call("POST", "/v1/keys/k/encrypt", svc, json={"items": items})
    assert r.status_code == 200
    assert calls == [ctxfmt.keyed_input({"i": str(i)}) for i in range(4)]
