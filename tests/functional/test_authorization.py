"""The authorization matrix: every role against every endpoint."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Api

ROLES = ("admin", "service", "auditor", "custodian", "requester", "anonymous", "bad-token")

# endpoint name -> (method, path, body, roles allowed)
ENDPOINTS: dict[str, tuple[str, str, Any, set[str]]] = {
    "create_principal": ("POST", "/v1/principals", {"name": "new", "role": "service"}, {"admin"}),
    "list_principals": ("GET", "/v1/principals", None, {"admin"}),
    "create_key": ("POST", "/v1/keys", {"alias": "fresh"}, {"admin"}),
    "list_keys": ("GET", "/v1/keys", None, {"admin", "auditor"}),
    "describe_key": ("GET", "/v1/keys/k", None, {"admin", "auditor"}),
    "grant": (
        "POST",
        "/v1/keys/k/grants",
        {"principal": "svc", "operations": ["decrypt"]},
        {"admin"},
    ),
    "rotate": ("POST", "/v1/keys/k/rotate", {}, {"admin"}),
    "disable": ("POST", "/v1/keys/k/disable", {}, {"admin"}),
    "enable": ("POST", "/v1/keys/k/enable", {}, {"admin"}),
    "schedule_deletion": ("POST", "/v1/keys/k/schedule-deletion", {"pending_days": 7}, {"admin"}),
    "cancel_deletion": ("POST", "/v1/keys/k/cancel-deletion", {}, {"admin"}),
    "datakey": ("POST", "/v1/keys/k/datakey", {}, {"service"}),
    "encrypt": ("POST", "/v1/keys/k/encrypt", {"plaintext": "aGk="}, {"service"}),
    "decrypt": ("POST", "/v1/decrypt", "BLOB", {"service"}),
    "rewrap": ("POST", "/v1/rewrap", "BLOB", {"service"}),
    "audit": ("GET", "/v1/audit", None, {"admin", "auditor"}),
}


def _headers(api: Api, role: str, svc: dict[str, str]) -> dict[str, str]:
    if role == "anonymous":
        return {}
    if role == "bad-token":
        return {"Authorization": "Bearer kms_not-a-real-token"}
    if role == "admin":
        return api.admin
    return svc if role == "service" else api.principal(role)


READS = {"list_principals", "list_keys", "describe_key", "audit"}


@pytest.mark.parametrize("ref_kind", ["alias", "key_id"])
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_matrix(api: Api, endpoint: str, role: str, ref_kind: str) -> None:
    svc = api.principal("service", "svc")
    key_id = api.key("k", grant=svc)
    blob = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    if endpoint == "cancel_deletion":
        api.call("POST", "/v1/keys/k/schedule-deletion", api.admin, json={"pending_days": 7})
    if endpoint == "enable":
        api.call("POST", "/v1/keys/k/disable", api.admin)
    method, path, body, allowed = ENDPOINTS[endpoint]
    if ref_kind == "key_id":
        path = path.replace("/keys/k", f"/keys/{key_id}")
    if body == "BLOB":
        body = {"ciphertext": blob}
    headers = _headers(api, role, svc)
    before = len(api.audit())
    r = api.call(method, path, headers, json=body)
    records = api.audit()[before:]
    if role in allowed:
        assert r.status_code in (200, 201), (r.status_code, r.json)
        # state changes and crypto are recorded; successful reads are not
        assert [x["outcome"] for x in records] == ([] if endpoint in READS else ["ok"])
        return
    if role in ("anonymous", "bad-token"):
        assert r.status_code == 401 and r.json["error"]["code"] == "unauthenticated"
        assert records == []  # logged, not chained: not attributable to a principal
        return
    assert r.status_code == 403 and r.json["error"]["code"] == "forbidden"
    assert "plaintext" not in r.json
    # exactly one record: the refusal, attributed to whoever asked
    assert [(x["outcome"], x["principal"]) for x in records] == [
        ("forbidden", headers.get("X-Name", "admin"))
    ]


def test_batch_items_are_checked_one_by_one(api: Api) -> None:
    svc = api.principal("service", "svc")
    api.key("mine", grant=svc)
    api.key("theirs")
    mine = api.call("POST", "/v1/keys/mine/datakey", svc, json={}).json["ciphertext"]
    other = api.principal("service", "other")
    api.call(
        "POST",
        "/v1/keys/theirs/grants",
        api.admin,
        json={"principal": "other", "operations": ["datakey"]},
    )
    theirs = api.call("POST", "/v1/keys/theirs/datakey", other, json={}).json["ciphertext"]
    r = api.call(
        "POST", "/v1/decrypt", svc, json={"items": [{"ciphertext": mine}, {"ciphertext": theirs}]}
    )
    results = r.json["results"]
    assert "plaintext" in results[0]
    assert (
        results[1] == {"error": results[1]["error"]} and results[1]["error"]["code"] == "forbidden"
    )


def test_rewrap_cannot_launder_a_blob_into_a_decryptable_key(api: Api) -> None:
    """rewrap on B plus decrypt on A must not read B: moving a blob to another key needs
    decrypt on its source too."""
    svc = api.principal("service", "svc")
    api.key("a", grant=svc, ops=("decrypt", "rewrap"))
    api.key("b", grant=svc, ops=("encrypt", "rewrap"))
    blob = api.call("POST", "/v1/keys/b/encrypt", svc, json={"plaintext": "U0VDUkVU"}).json
    moved = api.call(
        "POST", "/v1/rewrap", svc, json={"ciphertext": blob["ciphertext"], "destination_key": "a"}
    )
    assert moved.status_code == 403 and "ciphertext" not in moved.json
    same_key = api.call("POST", "/v1/rewrap", svc, json={"ciphertext": blob["ciphertext"]})
    assert same_key.status_code == 200  # rewrap within b is what the grant allows
    refused = api.call(
        "POST",
        "/v1/rewrap",
        svc,
        json={"ciphertext": blob["ciphertext"], "justification": "legal_request"},
    )
    assert refused.status_code == 403


def test_recheck_refuses_when_a_key_changed_meanwhile(api: Api, app) -> None:  # type: ignore[no-untyped-def]
    """On SQLite the request's single write transaction already excludes concurrent
    changes; the re-check is for databases with weaker isolation: a key disabled or a
    grant revoked after the look-ups refuses the request."""
    from kms.errors import Forbidden, KeyStateError
    from kms.services.key_use import Use
    from kms.services.key_work import KeyWork
    from kms.services.lookup_cache import LookupCache
    from kms.services.model import Permission

    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    storage = app.extensions["kms"].audit._storage
    principal = app.extensions["kms"].principals.authenticate(svc["Authorization"][7:])
    with storage.reader() as tx:
        work = KeyWork(lambda: tx, principal, LookupCache(0), None, admissions=False)
        work.use(work.key_id("k"), Use(Permission.DECRYPT, 1, "service_processing"))
        work.end_item(True)
    with storage.reader() as tx:
        work.commit(tx)  # nothing changed
    api.call("POST", "/v1/keys/k/disable", api.admin)
    with storage.reader() as tx, pytest.raises(KeyStateError):
        work.commit(tx)
    api.call("POST", "/v1/keys/k/enable", api.admin)
    api.call(
        "POST", "/v1/keys/k/grants", api.admin, json={"principal": "svc", "operations": ["datakey"]}
    )
    with storage.reader() as tx, pytest.raises(Forbidden):
        work.commit(tx)


def _decrypt(api: Api, svc: dict[str, str], blob: str, **extra: Any) -> Any:
    return api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob, **extra})


def _transactions_during(app, call) -> int:  # type: ignore[no-untyped-def]
    """How many database transactions ``call()`` began."""
    import sqlalchemy as sa

    engine = app.extensions["kms"].audit._storage._engine
    begun: list[object] = []
    listener = lambda conn: begun.append(conn)  # noqa: E731
    sa.event.listen(engine, "begin", listener)
    try:
        call()
    finally:
        sa.event.remove(engine, "begin", listener)
    return len(begun)


def test_a_repeated_decrypt_runs_one_transaction(api: Api, app) -> None:  # type: ignore[no-untyped-def]
    """The worker remembers the key and grant a decrypt was admitted with: the next decrypt
    of that key skips the read transaction and runs only the audited write transaction,
    which re-checks key state and grant from the database."""
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    blob = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    assert _transactions_during(app, lambda: _decrypt(api, svc, blob)) == 2  # read, write
    assert _transactions_during(app, lambda: _decrypt(api, svc, blob)) == 1  # write only
    assert _decrypt(api, svc, blob).status_code == 200


def test_a_decrypt_admitted_from_the_cache_is_still_refused_at_commit(api: Api) -> None:
    """Disabled, grant revoked, version retired after the worker cached the key: the
    re-check at commit refuses, the request is run again from the database and refused
    as without the cache, audited once, and no plaintext leaves."""
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    old = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    assert _decrypt(api, svc, old).status_code == 200  # cached now

    api.call("POST", "/v1/keys/k/disable", api.admin)
    refused = _decrypt(api, svc, old)
    assert refused.status_code == 409 and "plaintext" not in refused.json
    assert api.audit()[-1]["outcome"] == refused.json["error"]["code"] == "key_state"
    rid = refused.headers["X-Request-Id"]
    assert [r["request_id"] for r in api.audit()].count(rid) == 1
    api.call("POST", "/v1/keys/k/enable", api.admin)

    assert _decrypt(api, svc, old).status_code == 200  # cached again
    api.call("POST", "/v1/keys/k/rotate", api.admin)
    api.call("POST", "/v1/keys/k/config", api.admin, json={"min_decryption_version": 2})
    refused = _decrypt(api, svc, old)
    assert refused.status_code == 409 and "plaintext" not in refused.json
    assert refused.json["error"]["code"] == "key_version_retired"

    new = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    assert _decrypt(api, svc, new).status_code == 200  # cached again
    api.call(
        "POST", "/v1/keys/k/grants", api.admin, json={"principal": "svc", "operations": ["datakey"]}
    )
    refused = _decrypt(api, svc, new)
    assert refused.status_code == 403 and "plaintext" not in refused.json
    assert api.audit()[-1]["detail"] == "no grant"


def test_the_cache_never_refuses_what_the_database_allows(api: Api) -> None:
    """A justification granted after the worker cached the grant is honoured at once: a
    refusal is only ever made on data the request read itself."""
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    blob = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    assert _decrypt(api, svc, blob).status_code == 200  # cached: service_processing only
    refused = _decrypt(api, svc, blob, justification="customer_initiated")
    assert refused.status_code == 403
    api.call(
        "POST",
        "/v1/keys/k/grants",
        api.admin,
        json={
            "principal": "svc",
            "operations": ["decrypt"],
            "justifications": ["service_processing", "customer_initiated"],
        },
    )
    assert _decrypt(api, svc, blob, justification="customer_initiated").status_code == 200


def test_a_stale_cached_admission_refuses_only_its_own_batch_items(api: Api, app) -> None:  # type: ignore[no-untyped-def]
    """A key disabled after the worker cached it: the re-check at commit notices, the
    request is run again from the database, and only that key's items are refused (as
    without the cache); the stale entry is dropped, so the next request needs no rerun."""
    svc = api.principal("service", "svc")
    api.key("k1", grant=svc)
    api.key("k2", grant=svc)
    blobs = [api.call("POST", f"/v1/keys/{k}/datakey", svc, json={}).json for k in ("k1", "k2")]
    items = [{"ciphertext": b["ciphertext"]} for b in blobs]
    assert api.call("POST", "/v1/decrypt", svc, json={"items": items}).status_code == 200
    api.call("POST", "/v1/keys/k1/disable", api.admin)
    before = len(api.audit())

    batch = api.call("POST", "/v1/decrypt", svc, json={"items": items})
    assert batch.status_code == 200
    first, second = batch.json["results"]
    assert first["error"]["code"] == "key_state" and "plaintext" not in first
    assert second["plaintext"] == blobs[1]["plaintext"]
    records = api.audit()[before:]
    assert [(r["outcome"], r["request_id"]) for r in records] == [
        ("key_state", batch.headers["X-Request-Id"]),
        ("ok", batch.headers["X-Request-Id"]),
    ]  # one record per item, of the rerun only

    again = lambda: api.call("POST", "/v1/decrypt", svc, json={"items": items})  # noqa: E731
    assert _transactions_during(app, again) == 2  # read and write: no rerun


def test_a_rerun_that_cannot_be_recorded_fails_closed(api: Api, db_path: Path) -> None:
    """A cached admission refused at commit reruns from the database; if that rerun's
    records cannot be written, the caller gets 503 (not a 500) and nothing else."""
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    blob = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    assert _decrypt(api, svc, blob).status_code == 200  # cached now
    api.call("POST", "/v1/keys/k/disable", api.admin)
    with sqlite3.connect(db_path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_records "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    refused = _decrypt(api, svc, blob)
    assert refused.status_code == 503 and "plaintext" not in refused.json
    assert refused.json["error"]["code"] == "storage_unavailable"
