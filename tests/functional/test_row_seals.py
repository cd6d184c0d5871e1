"""Row seals (kms/services/seals.py) against a database writer, with the real SoftHSM
token and SQLite: rows made before seals existed are sealed once, when the chain is first
anchored, and never again; no command mints a second first admin over broken rows; a row
that does not even parse gets the ordinary refusal, never a 500; a run of the deletion
scheduler or a listing skips a broken row instead of failing."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from kms import config
from kms.app import build_services
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage, make_engine, upgrade
from kms.backends.storage import schema as t
from kms.bootstrap import secure_database
from kms.errors import SealBroken
from kms.services import state_index
from kms.services.audit_anchor import AuditAnchor
from kms.services.seals import RowSeals
from tests.helpers import Api, b64


def _raw(storage: SqlStorage, *statements: sa.Executable) -> None:
    """The database writer: statements outside the server."""
    with storage.transaction() as tx:
        for statement in statements:
            tx._c.execute(statement)


def _mint(name: str, token: str) -> list[sa.Executable]:
    now = datetime.now(UTC)
    return [
        sa.insert(t.principals).values(name=name, role="service", created_at=now),
        sa.insert(t.tokens).values(
            token_sha256=hashlib.sha256(token.encode()).hexdigest(),
            principal_id=sa.select(t.principals.c.id)
            .where(t.principals.c.name == name)
            .scalar_subquery(),
            created_at=now,
        ),
    ]


def test_rows_from_before_seals_are_sealed_once_then_never(tmp_path: Path, hsm: Pkcs11Hsm) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'legacy.sqlite3'}", "NORMAL")
    upgrade(engine)
    storage = SqlStorage(engine)
    services = build_services(storage, hsm)
    _raw(storage, *_mint("legacy-svc", "kms_legacy"))  # a database from before seals
    chain_id, sealed = secure_database(storage, services, allow_other_chains=True)
    try:
        assert chain_id is not None and sealed == {"principal": 1, "token": 1}
        assert services.principals.authenticate("kms_legacy").name == "legacy-svc"
        with storage.reader() as tx:
            (record,) = tx.audit_records(0, 10, query=None)
        assert record["operation"] == "seal_unsealed_rows"
        assert record["detail"] == "sealed rows as found: principal=1 token=1"
        # the sealing was a logged change of the anchored state: a process starting now
        # finds the tables matching the HSM state anchor
        with SqlStorage(engine, RowSeals(hsm)).reader() as tx:
            found = tx.principal_by_name("legacy-svc")
        assert found is not None and found.name == "legacy-svc"

        # Later, the database writer mints a principal; a routine `kms migrate` or
        # `kms init` (secure_database again) must not seal it.
        _raw(storage, *_mint("mallory", "kms_mallory"))
        assert secure_database(storage, services) == (None, {})
        with pytest.raises(SealBroken), storage.reader() as tx:
            tx.principal_by_name("mallory")
        with pytest.raises(Exception) as refused:
            services.principals.authenticate("kms_mallory")
        assert type(refused.value).__name__ == "Unauthenticated"
    finally:
        for label in (AuditAnchor.label(str(chain_id)), state_index.label(str(chain_id))):
            for value in hsm.anchor_values(label):
                hsm.drop_anchor(label, value)
        engine.dispose()


def test_no_second_first_admin_over_broken_rows(api: Api, storage: SqlStorage, app) -> None:  # type: ignore[no-untyped-def]
    """Every principal renamed and its seal broken: `kms init` (bootstrap_admin) still
    sees that principals exist and writes no new admin token."""
    _raw(
        storage,
        sa.update(t.principals).values(name=t.principals.c.name + "-old", seal="0" * 64),
    )
    assert app.extensions["kms"].principals.bootstrap_admin("admin") is None


@pytest.mark.parametrize(
    ("table", "assignment"),
    [
        ("keys", "state = 'bogus'"),
        ("keys", "escrow_policy = '{'"),
        ("keys", "created_at = 'garbage'"),
        ("keys", "seal = 'éééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééé'"),
        ("grants", "seal = 'éééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééé'"),
        ("grants", "seal = X'00112233'"),
    ],
)
def test_a_row_that_does_not_parse_gets_the_ordinary_refusal(
    api: Api, storage: SqlStorage, table: str, assignment: str
) -> None:
    svc = api.principal("service")
    key_id = api.key(grant=svc, ops=("encrypt", "decrypt"))
    r = api.call("POST", f"/v1/keys/{key_id}/encrypt", svc, json={"plaintext": b64(b"x")})
    assert r.status_code == 200
    blob = r.json["ciphertext"]
    _raw(storage, sa.text(f"UPDATE {table} SET {assignment}"))  # noqa: S608 (test constants)
    r = api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob})
    assert (r.status_code, r.json["error"]["code"]) == (403, "forbidden")
    record = api.audit()[-1]
    assert record["operation"] == "decrypt" and record["outcome"] == "forbidden"
    assert f"the {table[:-1]} row" in record["detail"]  # "... the seal of the key row ..."
    listed = api.call("GET", "/v1/keys", api.admin)  # a listing skips the row, never a 500
    assert listed.status_code == 200
    assert (key_id in [k["key_id"] for k in listed.json["keys"]]) is (table == "grants")


@pytest.mark.parametrize("assignment", ["role = 'root'", "created_at = 'garbage'"])
def test_a_principal_row_that_does_not_parse_is_an_unknown_token(
    api: Api, storage: SqlStorage, assignment: str
) -> None:
    svc = api.principal("service", "svc-x")
    _raw(storage, sa.text(f"UPDATE principals SET {assignment} WHERE name = 'svc-x'"))  # noqa: S608
    r = api.call("GET", "/v1/keys", svc)
    assert (r.status_code, r.json["error"]["code"]) == (401, "unauthenticated")
    listed = api.call("GET", "/v1/principals", api.admin)
    assert listed.status_code == 200 and "svc-x" not in [
        p["name"] for p in listed.json["principals"]
    ]
    (alarm,) = [r for r in api.audit() if r["operation"] == "authenticate"]
    assert " row " in alarm["detail"] and "malformed" in alarm["detail"]


def test_the_scheduler_skips_a_key_set_to_pending_deletion_in_the_database(
    api: Api, storage: SqlStorage, settings: config.Settings
) -> None:
    key_id = api.key()
    _raw(
        storage,
        sa.update(t.keys).values(
            state="pending_deletion", deletion_date=datetime(2020, 1, 1, tzinfo=UTC)
        ),
    )
    with storage.reader() as tx:
        assert tx.keys_in_states([]) == []
        from kms.services.model import KeyState

        assert tx.keys_in_states([KeyState.PENDING_DELETION]) == []
        assert tx.key_version(key_id, 1) is not None  # its material is untouched
