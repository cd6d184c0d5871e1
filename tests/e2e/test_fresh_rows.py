"""An older sealed copy of a row does not pass for the current one (issue 15, attack 4),
against real servers, a real SoftHSM token and SQLite or PostgreSQL.

An insider who writes the database but not the HSM keeps the rows of yesterday (each
carries a valid HSM seal) and writes them back after the keyholder changed them: a
revoked grant, a disabled key, a revoked SigV4 credential, a deleted XKS policy. Each
comes back refused at its next use with the ordinary answer, the precise reason in the
audit trail and an alarm. A rollback of a row nobody uses is caught by the next
checkpoint and by every process that starts (kms/services/state_index.py). The escrow
case budget's rollback is in tests/functional/test_escrow.py (run on both databases)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
import sqlalchemy as sa
from botocore.config import Config
from botocore.exceptions import ClientError

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


def _last(srv: Server, **filters: str) -> dict[str, Any]:
    """The newest audit record matching ``filters``; if the query itself is refused, the
    server's log lines about the sealed state are printed first, to say why."""
    try:
        return KmsClient(srv.url, srv.admin_token).audit(after=0, limit=1000, **filters)[-1]
    except Exception:
        lines = srv.log_text().splitlines()
        print("\n".join(x for x in lines if "sealed" in x or "state anchor" in x))
        raise


def _row(engine: sa.Engine, table: sa.Table, **where: Any) -> dict[str, Any]:
    with engine.begin() as c:
        clause = [table.c[k] == v for k, v in where.items()]
        return dict(c.execute(sa.select(table).where(*clause)).mappings().one())


def _put_back(engine: sa.Engine, table: sa.Table, row: dict[str, Any], *keys: str) -> None:
    """Write ``row`` (an earlier copy, with its seal) over the current one."""
    with engine.begin() as c:
        clause = [table.c[k] == row[k] for k in keys]
        assert c.execute(sa.update(table).where(*clause).values(row)).rowcount == 1


def _aws(srv: Server, access_key_id: str, secret: str) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=srv.url,
        region_name="us-east-1",
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def _attacks(data_dir: Path, engine: sa.Engine) -> None:
    env = {"KMS_AUTH_CACHE_SECONDS": "0", "KMS_LOOKUP_CACHE_SECONDS": "0"}
    with gunicorn_server(data_dir, workers=2, env=env) as srv:
        admin = KmsClient(srv.url, srv.admin_token)
        app_token = admin.create_principal("app", "service")["token"]
        k = admin.create_key("k")["key_id"]
        admin.grant("k", "app", ["encrypt", "decrypt"])
        blob = KmsClient(srv.url, app_token).encrypt("k", b"record of p-1", {"patient": "p-1"})
        assert post_decrypt(srv.url, app_token, blob).status_code == 200
        app_id = _row(engine, t.principals, name="app")["id"]

        # 1. A revoked grant written back: the same answer as no grant.
        granted = _row(engine, t.grants, key_id=k, principal_id=app_id)
        admin.grant("k", "app", [])
        revoked = post_decrypt(srv.url, app_token, blob)
        assert revoked.status_code == 403
        before = seal_failures(srv.url, "grant")
        _put_back(engine, t.grants, granted, "key_id", "principal_id")
        for _ in range(3):  # whichever worker answers
            r = post_decrypt(srv.url, app_token, blob)
            assert r.status_code == 403
            assert r.json()["error"]["message"] == revoked.json()["error"]["message"]
        record = _last(srv, principal="app", operation="decrypt")
        assert record["outcome"] == "forbidden"
        assert "grant row" in record["detail"] and "older sealed copy" in record["detail"]
        assert seal_failures(srv.url, "grant") >= before + 1

        # 2. A disabled key written back enabled, with the seal it had then. (The key
        # stays refused: its true row is gone until an operator restores it.)
        admin.grant("k", "app", ["encrypt", "decrypt"])
        k2 = admin.create_key("k2")["key_id"]
        admin.grant("k2", "app", ["encrypt", "decrypt"])
        blob2 = KmsClient(srv.url, app_token).encrypt("k2", b"x", {"patient": "p-1"})
        enabled = _row(engine, t.keys, key_id=k2)
        admin.key_action("k2", "disable")
        _put_back(engine, t.keys, enabled, "key_id")
        r = post_decrypt(srv.url, app_token, blob2)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert "older sealed copy" in _last(srv, operation="decrypt")["detail"]
        assert seal_failures(srv.url, "key") >= 1
        assert post_decrypt(srv.url, app_token, blob).status_code == 200  # other keys serve on

        # 3. A revoked SigV4 credential written back active.
        auth = {"Authorization": f"Bearer {srv.admin_token}"}
        path = srv.url + "/v1/principals/app/sigv4-credentials"
        cred = requests.post(path, json={}, headers=auth, timeout=30).json()
        aws = _aws(srv, cred["access_key_id"], cred["secret_access_key"])
        assert aws.describe_key(KeyId=k)["KeyMetadata"]["KeyId"] == k
        active = _row(engine, t.sigv4_credentials, access_key_id=cred["access_key_id"])
        gone = requests.delete(f"{path}/{cred['access_key_id']}", headers=auth, timeout=30)
        assert gone.json()["state"] == "revoked"
        _put_back(engine, t.sigv4_credentials, active, "access_key_id")
        with pytest.raises(ClientError) as refused:
            aws.describe_key(KeyId=k)
        assert refused.value.response["Error"]["Code"] in (
            "UnrecognizedClientException",
            "AccessDeniedException",
        )
        assert "older sealed copy" in srv.log_text()

        # 4. A restrictive XKS policy deleted (no row means the permissive default).
        xks = srv.url + f"/v1/keys/{k}/xks"
        set_ = requests.post(xks, json={"usage": ["encrypt"]}, headers=auth, timeout=30)
        assert set_.status_code == 200, set_.text
        with engine.begin() as c:
            c.execute(sa.delete(t.xks_key_policies).where(t.xks_key_policies.c.key_id == k))
        r = requests.get(xks, headers=auth, timeout=30)
        assert r.status_code == 403, r.text
        assert "was deleted from the database" in srv.log_text()

        # 5. A rollback of a row nobody uses: the next checkpoint refuses to sign it.
        other = admin.create_key("unused")["key_id"]
        unused = _row(engine, t.keys, key_id=other)
        admin.key_action("unused", "disable")
        _put_back(engine, t.keys, unused, "key_id")
        r = requests.post(
            srv.url + "/v1/audit/checkpoints",
            json={},
            headers={"Authorization": f"Bearer {srv.admin_token}"},
            timeout=30,
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "state_refused"
        metrics = requests.get(srv.url + "/metrics", timeout=10).text
        assert re.search(r"kms_state_refused_total [1-9]", metrics)

    # 6. ... and a server started on that database refuses every sealed row until an
    # operator looks (kms audit accept-state).
    with gunicorn_server(data_dir, workers=1, env=env, ready=False) as srv:
        r = post_decrypt(srv.url, app_token, blob)
        assert r.status_code == 503 and r.json()["error"]["code"] == "state_refused"
        ready = requests.get(srv.url + "/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["checks"]["sealed_state"] == "state_refused"


def test_rolled_back_rows_are_refused_in_sqlite(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "data")
    engine = sa.create_engine(f"sqlite:///{data / 'kms.sqlite3'}")
    try:
        _attacks(data, engine)
    finally:
        engine.dispose()


def test_rolled_back_rows_are_refused_in_postgresql(tmp_path: Path, pg_database: Any) -> None:
    data = init_pg(tmp_path / "data", pg_database.url)
    engine = sa.create_engine(pg_database.url)
    try:
        _attacks(data, engine)
    finally:
        engine.dispose()
