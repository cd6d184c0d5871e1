"""The Storage port and the audit chain on both databases: every test here runs once on
SQLite and once on a real PostgreSQL server (the ``any_storage`` fixture), through the
Flask app where the behaviour is an API one and through the Tx port where it is a
storage one."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage, make_engine, schema
from kms.config import ConfigError
from kms.errors import Conflict, SealBroken, StorageUnavailable
from kms.formats import audit_record
from kms.services.audit import AuditTrail, CheckpointPolicy
from kms.services.audit_verify import verify_bundle
from kms.services.clock import SystemClock
from kms.services.model import (
    AuditEvent,
    CaseState,
    Custodian,
    Decision,
    EscrowCase,
    Key,
    KeyState,
    KeyVersion,
    Notification,
    Role,
    SigV4Credential,
)
from tests.functional.test_audit_trail import public_key, traffic
from tests.helpers import Api, free_port


@pytest.fixture
def storage(any_storage: SqlStorage) -> SqlStorage:
    """The root fixtures (app, api) run on the backend of this test's parameter."""
    return any_storage


@pytest.fixture
def svc(api: Api) -> dict[str, str]:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    return svc


def export(api: Api) -> list[str]:
    r = api.call("GET", "/v1/audit/export", api.admin)
    assert r.status_code == 200, r.get_data()[:300]
    return [line.decode() for line in r.get_data().splitlines()]


def assert_linear(records: list[dict[str, Any]]) -> None:
    """seq 1..N without gaps, each record chained to the one before, hashes recomputable."""
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    prev = audit_record.GENESIS_HASH
    for r in records:
        body = {k: v for k, v in r.items() if k not in ("type", "hash")}
        assert r["prev_hash"] == prev and audit_record.record_hash(body) == r["hash"], r["seq"]
        prev = r["hash"]


# -- the audit chain ----------------------------------------------------------------------


def test_chain_checkpoints_and_export_verify(api: Api, svc: dict[str, str]) -> None:
    traffic(api, svc, 3)
    cp = api.call("POST", "/v1/audit/checkpoints", api.admin, json={})
    assert cp.status_code == 201
    traffic(api, svc, 1)
    lines = export(api)
    report = verify_bundle(lines, public_key(api))
    assert report.ok, report.errors
    assert report.last_signed_seq == cp.json["seq"] and report.unsigned_tail == 2
    records = [x for x in map(json.loads, lines) if x["type"] == "record"]
    assert_linear(records)
    assert [r["operation"] for r in records[-2:]] == ["datakey", "decrypt"]
    assert api.audit() == [{k: v for k, v in r.items() if k != "type"} for r in records]


def test_concurrent_appenders_on_separate_engines_make_one_chain(
    any_database_url: str, any_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """Four threads, each with its own engine (own connections, own SQLite lock file
    descriptor), append at once: one linear chain with every record exactly once."""
    engines = [make_engine(any_database_url, "NORMAL") for _ in range(4)]
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def append(n: int, engine: sa.Engine) -> None:
        trail = AuditTrail(SqlStorage(engine), SystemClock(), hsm, CheckpointPolicy(0))
        start.wait()
        try:
            for i in range(25):
                trail.record([AuditEvent(f"t{n}-{i}", "svc", "encrypt")])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=append, args=(n, e)) for n, e in enumerate(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for engine in engines:
        engine.dispose()
    assert errors == []
    with any_storage.reader() as tx:
        records = tx.audit_records(0, 1000)
        head = tx.audit_head()
    assert_linear(records)
    assert sorted(r["request_id"] for r in records) == sorted(
        f"t{n}-{i}" for n in range(4) for i in range(25)
    )
    assert (head.seq, head.hash) == (100, records[-1]["hash"])


def test_a_rolled_back_append_leaves_the_chain_as_it_was(
    any_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    trail = AuditTrail(any_storage, SystemClock(), hsm, CheckpointPolicy(0))
    trail.record([AuditEvent("r1", "svc", "encrypt")])
    with pytest.raises(RuntimeError), any_storage.transaction() as tx:
        trail.append_drafts(tx, trail.drafts([AuditEvent("r2", "svc", "encrypt")]))
        raise RuntimeError("the state change after the append failed")
    trail.record([AuditEvent("r3", "svc", "encrypt")])
    with any_storage.reader() as tx:
        records = tx.audit_records(0, 10)
    assert [r["request_id"] for r in records] == ["r1", "r3"]
    assert_linear(records)


def test_a_second_record_after_the_same_predecessor_is_refused(
    any_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """A fork needs two records at one seq (seq is the primary key): refused, and the
    chain stays as it was."""
    trail = AuditTrail(any_storage, SystemClock(), hsm, CheckpointPolicy(0))
    trail.record([AuditEvent("r1", "svc", "encrypt")])
    with any_storage.reader() as tx:
        first = tx.audit_records(0, 10)[0]
    fork = {**first, "request_id": "forged", "hash": "f" * 64}
    with pytest.raises(StorageUnavailable), any_storage.transaction() as tx:
        tx.insert_audit([fork])
    with any_storage.reader() as tx:
        assert tx.audit_records(0, 10) == [first]
        assert tx.audit_head().hash == first["hash"]


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("UPDATE audit_records SET principal = 'mallory' WHERE seq = 2", "seq 2: record edited"),
        ("DELETE FROM audit_records WHERE seq = 2", "seq 2: record(s) 2..2 deleted"),
    ],
)
def test_tampering_in_the_database_is_detected(
    api: Api, svc: dict[str, str], any_engine: sa.Engine, statement: str, expected: str
) -> None:
    traffic(api, svc, 2)
    api.call("POST", "/v1/audit/checkpoints", api.admin, json={})
    pem = public_key(api)
    assert verify_bundle(export(api), pem).ok
    with any_engine.begin() as conn:
        conn.execute(sa.text(statement))
    report = verify_bundle(export(api), pem)
    assert not report.ok
    assert any(expected in e for e in report.errors), report.errors


def test_filters_and_counts(api: Api, svc: dict[str, str], any_storage: SqlStorage) -> None:
    traffic(api, svc, 2)
    api.call("POST", "/v1/decrypt", svc, json={"ciphertext": "AAAA"})
    r = api.call("GET", "/v1/audit?operation=decrypt&outcome=ok", api.admin)
    assert len(r.json["records"]) == 2
    with any_storage.reader() as tx:
        counts = tx.audit_counts("2000-01-01", "2999-01-01")
    decrypts = {
        (c["outcome"], bool(c["escrow"])): c["count"] for c in counts if c["operation"] == "decrypt"
    }
    assert decrypts == {("ok", False): 2, ("decryption_failed", False): 1}


# -- key lifecycle ------------------------------------------------------------------------


def test_lifecycle_queries_and_destruction(
    api: Api, svc: dict[str, str], any_storage: SqlStorage, caplog: pytest.LogCaptureFixture
) -> None:
    old = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    assert api.call("POST", "/v1/keys/k/rotate", api.admin).status_code == 200
    new = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    for blob in (old, old, new):
        assert api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob}).status_code == 200
    key_id = api.call("GET", "/v1/keys/k", api.admin).json["key_id"]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    with any_storage.reader() as tx:
        usage = tx.version_usage(key_id)
        days = tx.usage_by_day(key_id, "2000-01-01")
        enabled = [k.key_id for k in tx.keys_in_states([KeyState.ENABLED])]
    assert [(v, n) for v, _, n, _ in usage] == [(1, 2), (2, 1)]
    assert all(isinstance(created, datetime) and last for _, created, _, last in usage)
    assert [(d.version, d.decrypts) for d in days] == [(1, 2), (2, 1)]
    assert {d.day for d in days} <= {
        today,
        (datetime.now(UTC) - timedelta(days=1)).date().isoformat(),
    }
    assert enabled == [key_id]

    api.call("POST", "/v1/keys/k/disable", api.admin)
    with any_storage.transaction() as tx:
        assert [k.key_id for k in tx.keys_in_states([KeyState.DISABLED])] == [key_id]
        assert tx.keys_in_states([KeyState.ENABLED]) == []
        assert tx.destroy_versions(key_id) == 2
    with any_storage.reader() as tx:
        assert tx.key_version(key_id, 1) is None and tx.key_version(key_id, 2) is None
    any_storage.purge_erased()
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


def test_timestamps_come_back_as_the_same_instant_in_utc(any_storage: SqlStorage) -> None:
    created = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=UTC)  # a DST night in Europe
    key = Key("k-time", None, "", KeyState.ENABLED, 1, created, rotated_at=created)
    with any_storage.transaction() as tx:
        tx.add_key(key)
        tx.add_version(KeyVersion("k-time", 1, created, b"\x00" * 40))
    with any_storage.reader() as tx:
        back = tx.key_by_id("k-time")
        version = tx.key_version("k-time", 1)
    assert back is not None and version is not None
    assert back.created_at == created and back.created_at.utcoffset() == timedelta(0)
    assert back.rotated_at == created and version.created_at == created
    assert version.wrapped == b"\x00" * 40


def test_the_wrap_mechanism_of_a_kek_is_kept_and_sealed(any_storage: SqlStorage) -> None:
    """What a KEK was wrapped with reads back as written, and a database writer who
    changes it, either way, breaks the row's seal."""
    now = datetime.now(UTC)
    with any_storage.transaction() as tx:
        tx.add_key(Key("k-mech", None, "", KeyState.ENABLED, 2, now, rotated_at=now))
        tx.add_version(KeyVersion("k-mech", 1, now, b"\x01" * 40))  # the legacy default
        tx.add_version(
            KeyVersion("k-mech", 2, now, b"\x02" * 40, "kms-root", "CKM_AES_KEY_WRAP_KWP")
        )
        owner = tx.add_principal("aws-mech", Role.SERVICE, "d" * 64, now)
        cred = SigV4Credential(
            "AKIDMECHANISM2345", owner, b"s", b"w", "kms-root", "active", "t0", "0x80000171"
        )
        tx.add_sigv4_credential(cred)
    with any_storage.reader() as tx:
        v1, v2 = tx.key_version("k-mech", 1), tx.key_version("k-mech", 2)
        found = tx.sigv4_credential("AKIDMECHANISM2345")
    assert v1 is not None and v1.wrap_mechanism == "CKM_AES_KEY_WRAP_PAD"
    assert (
        v2 is not None
        and v2.wrap_mechanism == "CKM_AES_KEY_WRAP_KWP"
        and v2.wrapped == b"\x02" * 40
    )
    assert found is not None and found.wrap_mechanism == "0x80000171"
    assert replace(found, principal=owner) == cred

    v, c = schema.key_versions.c, schema.sigv4_credentials.c
    edits: list[tuple[sa.Executable, Callable[[Any], object]]] = [
        # a legacy row given a recorded mechanism, a recorded one set back to the legacy
        (
            sa.update(schema.key_versions)
            .where(v.key_id == "k-mech", v.version == 1)
            .values(wrap_mechanism="CKM_AES_KEY_WRAP_KWP"),
            lambda tx: tx.key_version("k-mech", 1),
        ),
        (
            sa.update(schema.key_versions)
            .where(v.key_id == "k-mech", v.version == 2)
            .values(wrap_mechanism="CKM_AES_KEY_WRAP_PAD"),
            lambda tx: tx.key_version("k-mech", 2),
        ),
        (
            sa.update(schema.sigv4_credentials)
            .where(c.access_key_id == "AKIDMECHANISM2345")
            .values(wrap_mechanism="CKM_AES_KEY_WRAP_PAD"),
            lambda tx: tx.sigv4_credential("AKIDMECHANISM2345"),
        ),
    ]
    for edit, read in edits:
        with any_storage.transaction() as tx:
            tx._c.execute(edit)
        with pytest.raises(SealBroken), any_storage.reader() as tx:
            read(tx)
    with any_storage.transaction() as tx:  # an empty value does not even load
        tx._c.execute(
            sa.update(schema.key_versions)
            .where(v.key_id == "k-mech", v.version == 1)
            .values(wrap_mechanism="")
        )
    with pytest.raises(SealBroken) as refused, any_storage.reader() as tx:
        tx.key_version("k-mech", 1)
    assert "malformed" in str(refused.value.detail)


# -- principals, aliases, constraint violations --------------------------------------------


def test_constraint_violations_are_conflicts_and_roll_back(any_storage: SqlStorage) -> None:
    now = datetime.now(UTC)
    with any_storage.transaction() as tx:
        alice = tx.add_principal("alice", Role.SERVICE, "a" * 64, now)
        tx.add_key(Key("k1", "shared", "", KeyState.ENABLED, 1, now))
    with pytest.raises(Conflict), any_storage.transaction() as tx:
        tx.add_principal("alice", Role.ADMIN, "b" * 64, now)
    with pytest.raises(Conflict), any_storage.transaction() as tx:
        tx.add_key(Key("k2", "shared", "", KeyState.ENABLED, 1, now))
    with any_storage.reader() as tx:
        assert [p.name for p in tx.list_principals()] == ["alice"]
        holder = tx.token_holder("a" * 64)
        assert holder is not None and holder[0] == alice and holder[1].token_id == "a" * 16
        assert tx.token_holder("b" * 64) is None
        assert [k.key_id for k in tx.list_keys()] == ["k1"]  # k2 rolled back with its alias


# -- SigV4 credentials and replay nonces ---------------------------------------------------


def test_sigv4_credentials_and_replay_nonces(any_storage: SqlStorage) -> None:
    now = datetime.now(UTC)
    with any_storage.transaction() as tx:
        owner = tx.add_principal("aws-svc", Role.SERVICE, "c" * 64, now)
        cred = SigV4Credential(
            "AKIDEXAMPLE234567", owner, b"\x01sealed", b"\x02wrapped", "kms-root", "active", "t0"
        )
        tx.add_sigv4_credential(cred)
    with any_storage.transaction() as tx:
        found = tx.sigv4_credential("AKIDEXAMPLE234567")
        assert found is not None
        # (SQLite gives the principal's created_at back without its time zone)
        assert replace(found, principal=owner) == cred and found.principal.id == owner.id
        assert tx.sigv4_credential("AKIDNOTTHERE") is None
        tx.set_sigv4_state("AKIDEXAMPLE234567", "revoked")
    with any_storage.transaction() as tx:
        assert [c.state for c in tx.sigv4_credentials_of(owner.id)] == ["revoked"]

    def remember(nonce: str, expires: str, now: str) -> bool:
        with any_storage.transaction() as tx:
            return tx.remember_nonce(nonce, expires, now)

    assert remember("n1", "2026-01-01T00:05:00.000Z", "2026-01-01T00:00:00.000Z")
    assert not remember("n1", "2026-01-01T00:06:00.000Z", "2026-01-01T00:01:00.000Z")  # replay
    assert remember("n2", "2026-01-01T00:06:00.000Z", "2026-01-01T00:01:00.000Z")
    # once expired, a nonce is dropped (the signature's clock-skew check refuses it anyway)
    assert remember("n1", "2026-01-01T00:15:00.000Z", "2026-01-01T00:10:00.000Z")

    # pruning drops expired nonces only, in batches
    with any_storage.transaction() as tx:
        for i in range(5):
            assert tx.remember_nonce(f"old{i}", "2026-01-01T00:20:00.000Z", NOW)
        assert tx.remember_nonce("live", "2026-01-01T01:00:00.000Z", NOW)
    with any_storage.transaction() as tx:
        assert tx.prune_nonces("2026-01-01T00:30:00.000Z", 4) == 4
        assert tx.prune_nonces("2026-01-01T00:30:00.000Z", 4) == 3  # old4, n1, n2
        assert tx.prune_nonces("2026-01-01T00:30:00.000Z", 4) == 0
    assert not remember("live", "2026-01-01T01:00:00.000Z", "2026-01-01T00:30:00.000Z")


NOW = "2026-01-01T00:00:00.000Z"


def test_concurrent_replays_are_accepted_once(
    any_database_url: str, any_storage: SqlStorage
) -> None:
    engines = [make_engine(any_database_url, "NORMAL") for _ in range(4)]
    start = threading.Barrier(len(engines))
    accepted: list[bool] = []

    def replay(engine: sa.Engine) -> None:
        store = SqlStorage(engine)
        start.wait()
        for i in range(20):
            with store.transaction() as tx:
                accepted.append(tx.remember_nonce(f"n{i}", "2999-01-01T00:00:00.000Z", NOW))

    threads = [threading.Thread(target=replay, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for engine in engines:
        engine.dispose()
    assert len(accepted) == 80 and accepted.count(True) == 20


# -- escrow rows --------------------------------------------------------------------------


def _case(state: CaseState = CaseState.PENDING, used: int = 0) -> EscrowCase:
    return EscrowCase(
        case_id="case-1",
        version=1,
        requester="authority",
        legal_basis="court order 12/2026",
        reference="ref-1",
        justification="legal_request",
        scope={"keys": ["k1"]},
        max_unwraps=3,
        unwraps_used=used,
        expires_at="2026-12-01T00:00:00.000Z",
        state=state,
        digest="d" * 64,
        created_at="2026-11-01T00:00:00.000Z",
        mac="m" * 64,
    )


def test_escrow_rows(any_storage: SqlStorage) -> None:
    custodian = Custodian("dpo", "owner", b"\x07" * 32, "active", "t0", "m" * 64)
    with any_storage.transaction() as tx:
        tx.add_custodian(custodian)
        tx.add_case(_case())
    with pytest.raises(Conflict), any_storage.transaction() as tx:
        tx.add_custodian(custodian)
    approval = Decision("dpo", "approve", 1, b"\x09" * 64, "2026-11-02T00:00:00.000Z")
    with any_storage.transaction() as tx:
        tx.set_custodian_state("dpo", "revoked", "n" * 64)
        tx.add_decision("case-1", approval)
        case = tx.case("case-1")
        assert case == _case()
        tx.update_case(_case(CaseState.ACTIVE, used=1))
    with pytest.raises(Conflict), any_storage.transaction() as tx:
        tx.add_decision("case-1", approval)
    with any_storage.reader() as tx:
        assert tx.custodian("dpo") == Custodian(
            "dpo", "owner", b"\x07" * 32, "revoked", "t0", "n" * 64
        )
        assert tx.decisions("case-1") == [approval]
        assert tx.list_cases([CaseState.ACTIVE]) == [_case(CaseState.ACTIVE, used=1)]
        assert tx.list_cases([CaseState.PENDING]) == []


def test_notification_outbox_leases(any_storage: SqlStorage) -> None:
    with any_storage.transaction() as tx:
        for event in ("case_filed", "case_active"):
            tx.add_notification(Notification(0, "case-1", event, "{}", "pending", 0, "t1", "t9"))
    with any_storage.transaction() as tx:
        claimed = tx.claim_notifications(now="t1", lease_until="t5", limit=10)
    assert [n.event for n in claimed] == ["case_filed", "case_active"]
    with any_storage.transaction() as tx:
        assert tx.claim_notifications(now="t2", lease_until="t6", limit=10) == []  # leased
        tx.update_notification(
            Notification(claimed[0].id, "case-1", "case_filed", "{}", "delivered", 1, "t5", "t9")
        )
    with any_storage.transaction() as tx:
        again = tx.claim_notifications(now="t5", lease_until="t7", limit=10)
    assert [n.event for n in again] == ["case_active"]  # the lease ran out, not delivered
    with any_storage.reader() as tx:
        assert [n.state for n in tx.notifications("case-1")] == ["delivered", "pending"]


# -- configuration and an unreachable database --------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["mysql://kms@localhost/kms", "postgresql+asyncpg://kms@localhost/kms", "not a url"],
)
def test_unsupported_database_urls_are_refused_by_name(url: str) -> None:
    with pytest.raises(ConfigError, match="KMS_DATABASE_URL"):
        make_engine(url)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////nonexistent-directory/kms.sqlite3",
        f"postgresql+psycopg://kms:secret-pw@127.0.0.1:{free_port()}/kms",
    ],
)
def test_an_unreachable_database_is_storage_unavailable(url: str) -> None:
    storage = SqlStorage(make_engine(url))
    for attempt in (storage.check, lambda: storage.transaction().__enter__()):
        with pytest.raises(StorageUnavailable) as raised:
            attempt()
        assert raised.value.status == 503 and "secret-pw" not in str(raised.value.detail)
