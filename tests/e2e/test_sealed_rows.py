"""Rows that grant access are sealed by the HSM (issue 15, attack 1), against real
servers, a real SoftHSM token and SQLite or PostgreSQL. An insider who writes the
database but not the HSM mints a principal, a token and a grant, promotes a service to
admin, grants a service another key, or revives a disabled key: each gets the ordinary
refusal, and the audit trail, the metrics and the log get the precise reason."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from kms.backends.storage import schema as t
from kms.client import KmsClient
from tests.helpers import (
    Server,
    gunicorn_server,
    init_data_dir,
    post_decrypt,
    seal_failures,
)
from tests.storage.test_pg_nodes import init as init_pg

pytestmark = pytest.mark.e2e


def _records(srv: Server, **filters: str) -> list[dict[str, Any]]:
    return KmsClient(srv.url, srv.admin_token).audit(after=0, limit=1000, **filters)


def _attacks(data_dir: Path, engine: sa.Engine) -> None:
    # every request reads its principal afresh (no 5 s authentication cache to wait out)
    with gunicorn_server(data_dir, workers=2, env={"KMS_AUTH_CACHE_SECONDS": "0"}) as srv:
        admin = KmsClient(srv.url, srv.admin_token)
        app_token = admin.create_principal("app", "service")["token"]
        k = admin.create_key("k")["key_id"]
        k2 = admin.create_key("k2")["key_id"]
        admin.grant("k", "app", ["encrypt", "decrypt"])
        app = KmsClient(srv.url, app_token)
        blob = app.encrypt("k", b"record of p-1", {"patient": "p-1"})
        other_token = admin.create_principal("other2", "service")["token"]
        admin.grant("k2", "other2", ["encrypt", "decrypt"])
        blob2 = KmsClient(srv.url, other_token).encrypt("k2", b"x", {"patient": "p-1"})
        assert post_decrypt(srv.url, app_token, blob).status_code == 200
        unknown = post_decrypt(srv.url, "kms_" + secrets.token_urlsafe(32), blob)
        assert unknown.status_code == 401

        # 1. Mint a principal, its token and a grant, copying seals from real rows too.
        minted = "kms_" + secrets.token_urlsafe(32)
        with engine.begin() as c:
            real_token_seal = c.execute(sa.select(t.tokens.c.seal)).scalars().first()
            real_grant_seal = c.execute(sa.select(t.grants.c.seal)).scalars().first()
            pid = c.execute(
                sa.insert(t.principals).values(
                    name="mallory", role="service", created_at=datetime.now(UTC)
                )
            ).inserted_primary_key[0]
            c.execute(
                sa.insert(t.tokens).values(
                    token_sha256=hashlib.sha256(minted.encode()).hexdigest(),
                    principal_id=pid,
                    created_at=datetime.now(UTC),
                    seal=real_token_seal,
                )
            )
            c.execute(
                sa.insert(t.grants).values(
                    key_id=k,
                    principal_id=pid,
                    operations="decrypt,encrypt",
                    justifications="service_processing",
                    seal=real_grant_seal,
                )
            )
        before = seal_failures(srv.url, "principal")
        r = post_decrypt(srv.url, minted, blob)
        assert r.status_code == 401 and r.json()["error"] == unknown.json()["error"] | {
            "request_id": r.json()["error"]["request_id"]
        }
        assert seal_failures(srv.url, "principal") == before + 1
        (alarm,) = _records(srv, operation="authenticate")
        assert alarm["outcome"] == "forbidden" and alarm["principal"] is None
        assert alarm["detail"] == f"the principal row {pid},mallory is unsealed"
        assert "mallory" not in [p["name"] for p in admin.list_principals()]
        assert not [x for x in _records(srv, outcome="ok") if x["principal"] == "mallory"]

        # 2. Promote a service to admin in the database: its token stops working.
        with engine.begin() as c:
            c.execute(
                sa.update(t.principals).where(t.principals.c.name == "app").values(role="admin")
            )
        r = requests.get(
            srv.url + "/v1/principals", headers={"Authorization": f"Bearer {app_token}"}, timeout=10
        )
        assert r.status_code == 401
        assert (
            "the seal of the principal row" in _records(srv, operation="authenticate")[-1]["detail"]
        )
        with engine.begin() as c:
            c.execute(
                sa.update(t.principals).where(t.principals.c.name == "app").values(role="service")
            )

        # 3. Grant a service a key it has no grant on: the same answer as no grant at all.
        other3 = admin.create_principal("other3", "service")["token"]
        no_grant = post_decrypt(srv.url, other3, blob2)
        with engine.begin() as c:
            oid = c.execute(
                sa.select(t.principals.c.id).where(t.principals.c.name == "other3")
            ).scalar_one()
            c.execute(
                sa.insert(t.grants).values(
                    key_id=k2,
                    principal_id=oid,
                    operations="decrypt",
                    justifications="service_processing",
                )
            )
        forged = post_decrypt(srv.url, other3, blob2)
        seen = [
            (r.status_code, r.json()["error"]["code"], r.json()["error"]["message"])
            for r in (forged, no_grant)
        ]
        assert seen[0] == seen[1] == (403, "forbidden", "no decrypt grant on this key")
        record = _records(srv, principal="other3", operation="decrypt")[-1]
        assert record["outcome"] == "forbidden" and "grant row" in record["detail"]
        assert "unsealed" in record["detail"]

        # 4. Revive a disabled key in the database: refused, never used.
        admin.key_action("k2", "disable")
        with engine.begin() as c:
            c.execute(sa.update(t.keys).where(t.keys.c.key_id == k2).values(state="enabled"))
        r = post_decrypt(srv.url, other_token, blob2)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert "the seal of the key row" in _records(srv, operation="decrypt")[-1]["detail"]
        assert seal_failures(srv.url, "key") >= 1
        assert "database row fails its HSM seal" in srv.log_text()


def test_rows_written_in_sqlite_are_never_used(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "data")
    engine = sa.create_engine(f"sqlite:///{data / 'kms.sqlite3'}")
    try:
        _attacks(data, engine)
    finally:
        engine.dispose()


def test_rows_written_in_postgresql_are_never_used(tmp_path: Path, pg_database: Any) -> None:
    data = init_pg(tmp_path / "data", pg_database.url)
    engine = sa.create_engine(pg_database.url)
    try:
        _attacks(data, engine)
    finally:
        engine.dispose()
