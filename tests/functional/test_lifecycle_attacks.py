"""An insider review of the principal lifecycle (kms/services/principals.py and what it
touches): each test is one attack, by the database writer, by a single admin, through a
worker's caches or on the escrow custodian groups, and asserts the SAFE outcome. A test
marked ``# Was a HOLE`` failed when the review ran; its comment says how the attack
worked, and the fix it drove is in the code it names.

Real requests through the Flask test client over the real app and a real SoftHSM token;
database edits with sqlite3 on the test's database file (as the database writer would,
foreign keys not enforced)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms import config
from kms.app import create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage, make_engine
from kms.errors import HsmUnavailable, KmsError, Unauthenticated
from kms.services.audit_events import Caller
from kms.services.crypto import DecryptRequest
from kms.web.session import COOKIE
from tests import escrow_support
from tests.helpers import SECRET, Api, ManualClock, Receiver, b64
from tests.sigv4_request import signed

HTTPS = {"base_url": "https://localhost"}
XKS_PREFIX = "/attack/xks"
ALL_OPS = ("datakey", "encrypt", "decrypt", "rewrap", "xks_encrypt", "xks_decrypt")


# -- helpers ----------------------------------------------------------------------------


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def _sql(db_path: Path, sql: str, *params: Any) -> list[Any]:
    """One statement by the database writer (sqlite3: foreign keys are not enforced)."""
    with sqlite3.connect(db_path) as db:
        return db.execute(sql, params).fetchall()


def _datakey(api: Api, who: dict[str, str], key: str = "k") -> int:
    r = api.call("POST", f"/v1/keys/{key}/datakey", who, json={})
    assert r.status_code != 200 or "plaintext" in r.json
    return int(r.status_code)


def _tokens(api: Api, name: str) -> list[dict[str, Any]]:
    r = api.call("GET", f"/v1/principals/{name}/tokens", api.admin)
    assert r.status_code == 200, r.json
    return list(r.json["tokens"])


def _aws_datakey(
    client: Any, akid: str, secret: str, key_id: str, when: datetime | None = None
) -> int:
    """GenerateDataKey on the AWS KMS face, signed at ``when`` (default now)."""
    headers, body = signed(
        akid,
        secret,
        target="TrentService.GenerateDataKey",
        body={"KeyId": key_id, "KeySpec": "AES_256"},
        when=when,
    )
    r = client.post("/", data=body, headers=headers)
    assert r.status_code == 200 or "__type" in json.loads(r.data)
    return int(r.status_code)


def _xks_encrypt(
    client: Any, akid: str, secret: str, key: str, when: datetime | None = None
) -> int:
    """Encrypt on the XKS face, signed at ``when`` (default now)."""
    path = f"{XKS_PREFIX}/kms/xks/v1/keys/{key}/encrypt"
    body = {
        "requestMetadata": {
            "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
            "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/x",
            "kmsOperation": "Encrypt",
            "kmsRequestId": str(uuid.uuid4()),
        },
        "plaintext": b64(b"attack"),
        "encryptionAlgorithm": "AES_GCM",
    }
    data = json.dumps(body).encode()
    req = AWSRequest(
        "POST", f"http://localhost{path}", data=data, headers={"Content-Type": "application/json"}
    )
    signer = SigV4Auth(Credentials(akid, secret), "kms-xks-proxy", "us-east-1")
    if when is None:
        signer.add_auth(req)
    else:
        with mock.patch("botocore.auth.get_current_datetime", lambda: when):
            signer.add_auth(req)
    r = client.post(path, data=data, headers={k: str(v) for k, v in req.headers.items()})
    return int(r.status_code)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def _dashboard_login(client: Any, token: str) -> str:
    """Log ``client`` in to the dashboard with ``token``; the session's CSRF token."""
    page = client.get("/dashboard/login", **HTTPS).get_data(as_text=True)
    r = client.post("/dashboard/login", data={"csrf_token": _csrf(page), "token": token}, **HTTPS)
    assert r.status_code == 303, r.get_data(as_text=True)[:300]
    return _csrf(client.get("/dashboard/", **HTTPS).get_data(as_text=True))


def _session_cookie(app: Any, token: str) -> str:
    """A dashboard session of ``token`` (its cookie, as a browser holds or an attacker
    copies it)."""
    browser = app.test_client()
    _dashboard_login(browser, token)
    cookie = browser.get_cookie(COOKIE, domain="localhost", path="/dashboard")
    assert cookie is not None
    return str(cookie.value)


def _session_status(app: Any, cookie: str) -> int:
    """The dashboard overview's status for a browser presenting ``cookie`` (200: the
    session is alive; 303: sent to the login page); never a 500."""
    browser = app.test_client()
    browser.set_cookie(COOKIE, cookie, domain="localhost", path="/dashboard")
    status = int(browser.get("/dashboard/", **HTTPS).status_code)
    assert status != 500
    return status


def _records(api: Api, operation: str) -> list[dict[str, Any]]:
    return [x for x in api.audit() if x["operation"] == operation]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def capp(settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, clock: ManualClock) -> Any:
    """The app on a clock the test moves, the XKS face under XKS_PREFIX, no token cap."""
    return create_app(
        dataclasses.replace(settings, xks_uri_prefix=XKS_PREFIX),
        hsm=hsm,
        storage=storage,
        clock=clock,
    )


@pytest.fixture
def capi(capp: Any) -> Api:
    token = capp.extensions["kms"].principals.bootstrap_admin("admin")
    assert token is not None
    return Api(capp.test_client(), token)


# == the database writer ================================================================


@pytest.mark.parametrize("edit", ["copy_seal", "swap_ids", "swap_names"])
def test_db_writer_cannot_re_enable_a_principal_with_another_principals_row(
    api: Api, db_path: Path, edit: str
) -> None:
    """The disabled principal's row made to look like an enabled principal's: its
    lifecycle fields and seal copied over, the two rows' ids swapped (tokens following),
    or their names swapped. Every seal binds the row's id and name."""
    svc = api.principal("service", "svc")
    other = api.principal("service", "other")
    api.key("k", grant=svc)
    assert _datakey(api, svc) == 200
    assert api.call("POST", "/v1/principals/svc/disable", api.admin, json={}).status_code == 200
    (svc_id,) = _sql(db_path, "SELECT id FROM principals WHERE name = 'svc'")[0]
    (other_id,) = _sql(db_path, "SELECT id FROM principals WHERE name = 'other'")[0]
    if edit == "copy_seal":
        _sql(
            db_path,
            "UPDATE principals SET (disabled_at, sessions_since, seal) = "
            "(SELECT disabled_at, sessions_since, seal FROM principals WHERE id = ?) "
            "WHERE id = ?",
            other_id,
            svc_id,
        )
    elif edit == "swap_ids":
        for a, b in ((svc_id, -1), (other_id, svc_id), (-1, other_id)):
            _sql(db_path, "UPDATE principals SET id = ? WHERE id = ?", b, a)
            _sql(db_path, "UPDATE tokens SET principal_id = ? WHERE principal_id = ?", b, a)
            _sql(db_path, "UPDATE grants SET principal_id = ? WHERE principal_id = ?", b, a)
    else:
        _sql(db_path, "UPDATE principals SET name = 'tmp' WHERE id = ?", svc_id)
        _sql(db_path, "UPDATE principals SET name = 'svc' WHERE id = ?", other_id)
        _sql(db_path, "UPDATE principals SET name = 'other' WHERE id = ?", svc_id)
    assert _datakey(api, svc) == 401
    assert _datakey(api, other) in (401, 403)  # never svc's grant


def test_db_writer_cannot_move_copy_or_forge_token_rows(api: Api, db_path: Path) -> None:
    """A token row re-pointed at the admin, a token row minted for the admin with the
    admin token's seal, and a revoked token inserted back, for its principal or another."""
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    (admin_id,) = _sql(db_path, "SELECT id FROM principals WHERE name = 'admin'")[0]
    (svc_id,) = _sql(db_path, "SELECT id FROM principals WHERE name = 'svc'")[0]
    # 1. svc's token moved to the admin: no admin, and no svc either
    _sql(db_path, "UPDATE tokens SET principal_id = ? WHERE principal_id = ?", admin_id, svc_id)
    assert api.call("GET", "/v1/principals", svc).status_code == 401
    assert _datakey(api, svc) == 401
    _sql(
        db_path,
        "UPDATE tokens SET principal_id = ? WHERE principal_id = ? AND token_sha256 = ?",
        svc_id,
        admin_id,
        hashlib.sha256(_token(svc).encode()).hexdigest(),
    )
    assert _datakey(api, svc) == 200  # put back exactly: the server's row again
    # 2. a token minted for the admin, with the admin token's seal
    mine = "kms_" + "A" * 43
    (seal,) = _sql(db_path, "SELECT seal FROM tokens WHERE principal_id = ?", admin_id)[0]
    _sql(
        db_path,
        "INSERT INTO tokens (token_sha256, principal_id, created_at, seal) "
        "VALUES (?, ?, '2026-01-01 00:00:00.000000', ?)",
        hashlib.sha256(mine.encode()).hexdigest(),
        admin_id,
        seal,
    )
    assert api.call("GET", "/v1/principals", _bearer(mine)).status_code == 401
    # 3. svc's token revoked, then inserted back with its old seal, for svc or the admin
    (row,) = _sql(db_path, "SELECT * FROM tokens WHERE principal_id = ?", svc_id)
    (tok,) = _tokens(api, "svc")
    gone = api.call("DELETE", f"/v1/principals/svc/tokens/{tok['token_id']}", api.admin)
    assert gone.status_code == 200
    cols = [c[1] for c in _sql(db_path, "PRAGMA table_info(tokens)")]
    values = dict(zip(cols, row, strict=True))
    marks = ",".join("?" * len(cols))
    for owner in (svc_id, admin_id):
        values["principal_id"] = owner
        _sql(db_path, "DELETE FROM tokens WHERE token_sha256 = ?", values["token_sha256"])
        _sql(db_path, f"INSERT INTO tokens VALUES ({marks})", *values.values())  # noqa: S608
        assert api.call("GET", "/v1/principals", svc).status_code == 401
        assert _datakey(api, svc) == 401


def test_db_writer_cannot_restore_a_token_row_from_before_its_rotation(
    capi: Api, db_path: Path, clock: ManualClock
) -> None:
    """Rotation with a grace period moves the old token's sealed expiry; the row from
    before it (no expiry, its seal then) put back is an older sealed copy."""
    svc = capi.principal("service", "svc")
    capi.key("k", grant=svc)
    (tok,) = _tokens(capi, "svc")
    (before,) = _sql(
        db_path,
        "SELECT expires_at, seal FROM tokens WHERE token_sha256 LIKE ?",
        tok["token_id"] + "%",
    )
    path = f"/v1/principals/svc/tokens/{tok['token_id']}/rotate"
    assert capi.call("POST", path, svc, json={"grace_seconds": 60}).status_code == 201
    _sql(
        db_path,
        "UPDATE tokens SET expires_at = ?, seal = ? WHERE token_sha256 LIKE ?",
        *before,
        tok["token_id"] + "%",
    )
    clock.advance(61)
    assert _datakey(capi, svc) == 401


@pytest.mark.parametrize("how", ["clear", "older_copy"])
def test_db_writer_cannot_revive_an_ended_dashboard_session(
    capi: Api, capp: Any, db_path: Path, clock: ManualClock, how: str
) -> None:
    """Ending an auditor's sessions sets the sealed ``sessions_since``; clearing it, or
    putting back the row from before, does not bring the session back (nor a 500)."""
    aud = capi.principal("auditor", "aud")
    cookie = _session_cookie(capp, _token(aud))
    assert _session_status(capp, cookie) == 200
    (before,) = _sql(db_path, "SELECT sessions_since, seal FROM principals WHERE name = 'aud'")
    clock.advance(5)
    ended = capi.call("POST", "/v1/principals/aud/sessions/end", capi.admin, json={})
    assert ended.status_code == 200
    assert _session_status(capp, cookie) == 303
    if how == "clear":
        _sql(db_path, "UPDATE principals SET sessions_since = NULL WHERE name = 'aud'")
    else:
        edit = "UPDATE principals SET sessions_since = ?, seal = ? WHERE name = 'aud'"
        _sql(db_path, edit, *before)
    assert _session_status(capp, cookie) != 200


def test_db_writer_moving_last_used_at_grants_nothing(api: Api, db_path: Path) -> None:
    """``last_used_at`` is not sealed: moving it changes nothing that decides access."""
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    assert _datakey(api, svc) == 200
    _sql(db_path, "UPDATE tokens SET last_used_at = '1999-01-01 00:00:00.000000'")
    assert _datakey(api, svc) == 200
    assert api.call("GET", "/v1/principals", svc).status_code == 403  # still a service
    (tok,) = _tokens(api, "svc")
    assert tok["last_used_at"].startswith("1999")  # informational only


@pytest.mark.parametrize("column", ["last_used_at", "created_at"])
def test_db_writer_cannot_make_a_token_escape_its_revocation(
    api: Api, app: Any, db_path: Path, column: str
) -> None:
    # Was a HOLE, fixed: the token row's unsealed columns (last_used_at, created_at) must parse for
    # the row to be read at all. The database writer who holds a leaked token puts a
    # value there that does not parse: the token drops out of the listing, and the
    # admin's revocation answers 404 "has no token" (the row still exists); once the
    # value is put back, the token that the admin meant to revoke works again. Fix:
    # revoke by (principal, token id) on the key column alone (DELETE ... WHERE
    # principal_id = ? AND token_sha256 LIKE '<id>%'), whatever the other columns hold,
    # or read the informational columns leniently.
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    assert _datakey(api, svc) == 200
    (tok,) = _tokens(api, "svc")
    (saved,) = _sql(
        db_path,
        f"SELECT {column} FROM tokens WHERE token_sha256 LIKE ?",  # noqa: S608
        tok["token_id"] + "%",
    )[0]
    _sql(db_path, f"UPDATE tokens SET {column} = 'garbage'")  # noqa: S608
    revoked = api.call("DELETE", f"/v1/principals/svc/tokens/{tok['token_id']}", api.admin)
    assert revoked.status_code in (200, 404), revoked.json
    _sql(db_path, f"UPDATE tokens SET {column} = ?", saved)  # noqa: S608
    app.extensions["kms"].principals._forget()  # past KMS_AUTH_CACHE_SECONDS
    assert _datakey(api, svc) == 401


@pytest.mark.parametrize("role", ["service", "admin"])
def test_db_writer_deleting_a_principal_row_does_not_hand_its_tokens_and_grants_on(
    api: Api, app: Any, db_path: Path, role: str
) -> None:
    # Was a HOLE, fixed: principal ids are reused. principals.id is an SQLite INTEGER PRIMARY KEY
    # without AUTOINCREMENT, so after the database writer deletes the newest principal's
    # row (leaving its tokens, grants and SigV4 credentials), the next principal an admin
    # creates gets the same id. Token, grant and credential seals bind only principal_id,
    # and the state index sees the new principal row as an update of row <id>, so the
    # deletion is never noticed (the next checkpoint signs the state): the disabled
    # principal's old tokens authenticate as the newcomer (as an admin, if the newcomer
    # is one: GET /v1/principals answers 200) and its grants apply to the newcomer. (On
    # PostgreSQL the writer could reset the id sequence to the same effect; not tested.)
    # Fix: before inserting a principal, refuse an id the anchored state still holds
    # (TxSeals.absent("principal", ident(id)) raising "deleted from the database"), and/or
    # bind token, grant and credential seals to the principal's (id, name); make the id
    # AUTOINCREMENT on SQLite.
    old = api.principal("service", "svc-old")
    api.key("k", grant=old)
    assert _datakey(api, old) == 200
    assert api.call("POST", "/v1/principals/svc-old/disable", api.admin, json={}).status_code == 200
    assert _datakey(api, old) == 401
    _sql(db_path, "DELETE FROM principals WHERE name = 'svc-old'")
    r = api.call("POST", "/v1/principals", api.admin, json={"name": "newcomer", "role": role})
    assert r.status_code in (201, 403, 409), r.json
    newcomer = _bearer(r.json["token"]) if r.status_code == 201 else None
    # the disabled principal's token stays cut off
    assert api.call("GET", "/v1/principals", old).status_code == 401
    assert _datakey(api, old) == 401
    # and the deletion does not go unnoticed: the next checkpoint refuses the state
    with pytest.raises(KmsError):
        app.extensions["kms"].audit.checkpoint()
    if newcomer is not None and role == "service":
        assert _datakey(api, newcomer) in (403, 404)  # nobody granted it anything


# == a single admin =====================================================================


@pytest.mark.parametrize("step", ["re_enable_itself", "create_an_admin", "enable_another"])
def test_an_admin_disabled_while_its_request_is_in_flight_changes_nothing(
    api: Api, app: Any, step: str
) -> None:
    # Was a HOLE, fixed: only the key-use pipeline checks, at commit, that the caller's principal is
    # still enabled (KeyWork.commit). Every administrative operation trusts the
    # principal read at authentication: an admin disabled while its request is in flight
    # (it authenticated just before, e.g. by keeping requests in flight in a loop) can
    # still enable itself again, create a fresh admin it holds the token of, enable an
    # accomplice, grant, issue tokens... Fix: re-read the caller's principal inside every
    # write transaction (e.g. in AuditTrail.append or the Store's transaction) and refuse
    # a disabled or vanished one, as KeyWork.commit does.
    mallory = api.principal("admin", "mallory")
    api.principal("service", "accomplice")
    api.call("POST", "/v1/principals/accomplice/disable", api.admin, json={})
    services = app.extensions["kms"]
    in_flight = services.principals.authenticate(_token(mallory))
    assert api.call("POST", "/v1/principals/mallory/disable", api.admin, json={}).status_code == 200
    caller = Caller("in-flight", in_flight)
    try:
        if step == "re_enable_itself":
            services.principals.set_enabled(caller, "mallory", True)
        elif step == "create_an_admin":
            services.principals.create(caller, "mallory-2", "admin")
        else:
            services.principals.set_enabled(caller, "accomplice", True)
        outcome = "done"
    except KmsError:
        outcome = "refused"
    assert outcome == "refused"
    listed = {p["name"]: p for p in api.call("GET", "/v1/principals", api.admin).json["principals"]}
    assert listed["mallory"]["state"] == "disabled"
    assert "mallory-2" not in listed
    assert listed["accomplice"]["state"] == "disabled"


def test_the_last_enabled_admin_rule_holds_in_flight_and_when_repeated(api: Api, app: Any) -> None:
    """Two admins disabling each other at the same time: the second, already disabled
    but in flight, cannot disable the first (the last enabled admin); disabling a
    disabled admin again changes nothing; nobody disables itself."""
    bob = api.principal("admin", "bob")
    services = app.extensions["kms"]
    bob_in_flight = services.principals.authenticate(_token(bob))
    assert api.call("POST", "/v1/principals/bob/disable", api.admin, json={}).status_code == 200
    with pytest.raises(KmsError):
        services.principals.set_enabled(Caller("race", bob_in_flight), "admin", False)
    assert api.call("POST", "/v1/principals/bob/disable", api.admin, json={}).status_code == 200
    assert api.call("POST", "/v1/principals/admin/disable", api.admin, json={}).status_code == 409
    assert api.call("GET", "/v1/principals", api.admin).status_code == 200


def test_the_last_enabled_admin_cannot_lock_everyone_out_by_revoking_its_tokens(
    api: Api,
) -> None:
    # Was a HOLE (availability), fixed: "an admin cannot disable itself nor the last enabled admin"
    # keeps the server administrable, but revoking the last enabled admin's last token
    # has the same effect and is accepted: nobody can administer the server any more
    # (no principal can be created, enabled or issued a token; `kms init` bootstraps
    # only an empty database). Fix: refuse (409) revoking the last unexpired token of the
    # last enabled admin, as set_enabled refuses disabling it.
    (tok,) = _tokens(api, "admin")
    r = api.call("DELETE", f"/v1/principals/admin/tokens/{tok['token_id']}", api.admin)
    assert r.status_code == 409, r.json
    assert api.call("GET", "/v1/principals", api.admin).status_code == 200


def test_an_admin_rotating_another_principals_token_is_on_the_record(api: Api) -> None:
    """Known limit (SECURITY.md, "Token issuance is an admin's word"): an admin obtains
    a working token of another principal by rotating or issuing one; both steps are
    recorded under the admin's name with the new token's id, never the token."""
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    (tok,) = _tokens(api, "svc")
    path = f"/v1/principals/svc/tokens/{tok['token_id']}/rotate"
    rotated = api.call("POST", path, api.admin, json={})
    assert rotated.status_code == 201
    assert _datakey(api, svc) == 401  # grace 0: the holder's token ended at once
    (record,) = _records(api, "rotate_token")
    assert record["principal"] == "admin" and rotated.json["token_id"] in record["detail"]
    assert rotated.json["token"] not in json.dumps(api.audit())


def test_a_principal_cannot_outlive_the_expiry_an_admin_gave_its_token(
    capi: Api, clock: ManualClock
) -> None:
    # Was a HOLE, fixed: a principal may rotate its own tokens, and the new token's lifetime is only
    # what it asks for, capped by the role's KMS_TOKEN_MAX_LIFETIME (unset by default):
    # a service an admin gave a 1-hour token rotates it once and holds a token that never
    # expires. Fix: a rotation by the principal itself must not end later than the token
    # it replaces (new expiry = min(asked, role cap, old expires_at)); only an admin
    # issues longer.
    svc = capi.principal("service", "svc")
    capi.key("k", grant=svc)
    issued = capi.call("POST", "/v1/principals/svc/tokens", capi.admin, json={"ttl_seconds": 3600})
    assert issued.status_code == 201
    short = _bearer(issued.json["token"])
    (first, _) = _tokens(capi, "svc")
    capi.call("DELETE", f"/v1/principals/svc/tokens/{first['token_id']}", capi.admin)
    path = f"/v1/principals/svc/tokens/{issued.json['token_id']}/rotate"
    rotated = capi.call("POST", path, short, json={})
    assert rotated.status_code == 201
    clock.advance(3601)
    assert _datakey(capi, _bearer(rotated.json["token"])) == 401


def test_rotating_one_token_again_and_again_does_not_multiply_tokens(capi: Api) -> None:
    # Was a HOLE (minor): a token in its rotation grace period could be rotated again; each
    # rotation issues one more token, so a principal that "may only rotate a token it
    # holds" issues itself any number of live tokens from one. Fix: refuse rotating a
    # token whose expiry a rotation already set (409), or end the tokens earlier
    # rotations of it issued.
    svc = capi.principal("service", "svc")
    (tok,) = _tokens(capi, "svc")
    path = f"/v1/principals/svc/tokens/{tok['token_id']}/rotate"
    answers = [capi.call("POST", path, svc, json={"grace_seconds": 600}) for _ in range(4)]
    assert answers[0].status_code == 201
    assert [a.status_code for a in answers[1:]] == [409, 409, 409]
    assert len(_tokens(capi, "svc")) <= 2


def test_ended_sessions_stay_ended_when_a_node_s_clock_is_behind(
    capi: Api, capp: Any, clock: ManualClock
) -> None:
    # Was a HOLE (minor), fixed: end_sessions (and a disable) writes sessions_since = now, even when
    # that is earlier than the value already sealed, as on a node whose clock lags the
    # one that disabled the principal. Sessions that logged in between the two instants,
    # ended by the disable, are alive again. Fix: sessions_since = max(current, now) in
    # end_sessions and set_enabled.
    aud = capi.principal("auditor", "aud")
    clock.advance(100)
    cookie = _session_cookie(capp, _token(aud))  # logged in at T0 + 100
    clock.advance(100)
    assert capi.call("POST", "/v1/principals/aud/disable", capi.admin, json={}).status_code == 200
    assert capi.call("POST", "/v1/principals/aud/enable", capi.admin, json={}).status_code == 200
    assert _session_status(capp, cookie) == 303  # ended by the disable (T0 + 200)
    clock.advance(-150)  # served by a node whose clock is 150 s behind
    ended = capi.call("POST", "/v1/principals/aud/sessions/end", capi.admin, json={})
    assert ended.status_code == 200
    clock.advance(150)
    assert _session_status(capp, cookie) == 303


# == every face of a disabled principal ==================================================


def test_a_disabled_principal_is_refused_on_every_face(
    capi: Api, capp: Any, clock: ManualClock
) -> None:
    """Bearer, client certificate name, SigV4 on the AWS KMS face and on the XKS face,
    a dashboard session, and tokens an admin issues or rotates for it while disabled."""
    services = capp.extensions["kms"]
    svc = capi.principal("service", "svc")
    key_id = capi.key("k", grant=svc, ops=ALL_OPS)
    cred = capi.call("POST", "/v1/principals/svc/sigv4-credentials", capi.admin).json
    akid, secret = cred["access_key_id"], cred["secret_access_key"]
    assert _datakey(capi, svc) == 200
    assert services.principals.by_certificate_name("svc").name == "svc"
    assert _aws_datakey(capi.client, akid, secret, key_id, clock.now_) == 200
    assert _xks_encrypt(capi.client, akid, secret, "k", clock.now_) == 200
    aud = capi.principal("auditor", "aud")
    cookie = _session_cookie(capp, _token(aud))
    assert _session_status(capp, cookie) == 200
    for name in ("svc", "aud"):
        assert (
            capi.call("POST", f"/v1/principals/{name}/disable", capi.admin, json={}).status_code
            == 200
        )
    assert _datakey(capi, svc) == 401
    with pytest.raises(Unauthenticated):
        services.principals.by_certificate_name("svc")
    assert _aws_datakey(capi.client, akid, secret, key_id, clock.now_) == 400
    assert _xks_encrypt(capi.client, akid, secret, "k", clock.now_) == 401
    assert _session_status(capp, cookie) == 303
    # a token issued or rotated for it while disabled is refused too
    issued = capi.call("POST", "/v1/principals/svc/tokens", capi.admin, json={})
    assert issued.status_code == 201 and _datakey(capi, _bearer(issued.json["token"])) == 401
    tok = _tokens(capi, "svc")[0]
    path = f"/v1/principals/svc/tokens/{tok['token_id']}/rotate"
    rotated = capi.call("POST", path, capi.admin, json={})
    assert rotated.status_code == 201 and _datakey(capi, _bearer(rotated.json["token"])) == 401
    # its own API is closed to it: it cannot rotate, revoke or end anything itself
    assert capi.call("POST", path, svc, json={}).status_code == 401
    # enabling it again does not revive the dashboard session it had
    assert capi.call("POST", "/v1/principals/aud/enable", capi.admin, json={}).status_code == 200
    assert _session_status(capp, cookie) == 303


# == worker caches ======================================================================


@contextmanager
def _nodes(
    settings: config.Settings, hsm: Pkcs11Hsm, db_path: Path, cache_seconds: int
) -> Iterator[list[Any]]:
    """Two apps, each with its own engine, seals, state index and caches, on one database
    (two workers or nodes)."""
    engines = [make_engine(f"sqlite:///{db_path}", "NORMAL") for _ in range(2)]
    more = dataclasses.replace(settings, auth_cache_seconds=cache_seconds)
    try:
        yield [create_app(more, hsm=hsm, storage=SqlStorage(e)) for e in engines]
    finally:
        for e in engines:
            e.dispose()


def test_a_change_on_one_node_reaches_the_other_nodes_caches_at_once(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, db_path: Path
) -> None:
    with _nodes(settings, hsm, db_path, 300) as (one, two):
        token = one.extensions["kms"].principals.bootstrap_admin("admin")
        a, b = Api(one.test_client(), token), Api(two.test_client(), token)
        svc = a.principal("service", "svc")
        key_id = a.key("k", grant=svc)
        cred = a.call("POST", "/v1/principals/svc/sigv4-credentials", a.admin).json
        akid, secret = cred["access_key_id"], cred["secret_access_key"]
        for _ in range(2):  # remembered by node one
            assert _datakey(a, svc) == 200
            assert _aws_datakey(a.client, akid, secret, key_id) == 200
            assert one.extensions["kms"].principals.by_certificate_name("svc")
        assert b.call("POST", "/v1/principals/svc/disable", b.admin, json={}).status_code == 200
        assert _datakey(a, svc) == 401
        assert _aws_datakey(a.client, akid, secret, key_id) == 400
        with pytest.raises(Unauthenticated):
            one.extensions["kms"].principals.by_certificate_name("svc")
        # a token rotated away (grace 0) and a token revoked on node two: the same
        assert b.call("POST", "/v1/principals/svc/enable", b.admin, json={}).status_code == 200
        assert _datakey(a, svc) == 200
        (tok,) = _tokens(b, "svc")
        path = f"/v1/principals/svc/tokens/{tok['token_id']}/rotate"
        new = _bearer(b.call("POST", path, b.admin, json={}).json["token"])
        assert _datakey(a, svc) == 401 and _datakey(a, new) == 200
        new_id = next(t for t in _tokens(b, "svc") if t["token_id"] != tok["token_id"])
        gone = b.call("DELETE", f"/v1/principals/svc/tokens/{new_id['token_id']}", b.admin)
        assert gone.status_code == 200
        assert _datakey(a, new) == 401


def test_an_hsm_outage_does_not_let_a_remembered_disabled_principal_use_a_key(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, db_path: Path
) -> None:
    """While a worker cannot read the state anchor, it keeps serving the look-ups it
    remembers (SECURITY.md, known limits). A principal disabled on another node just
    before still gets no key use there (re-checked at commit), and nothing is served past
    KMS_AUTH_CACHE_SECONDS."""
    with _nodes(settings, hsm, db_path, 2) as (one, two):
        token = one.extensions["kms"].principals.bootstrap_admin("admin")
        a, b = Api(one.test_client(), token), Api(two.test_client(), token)
        svc = a.principal("service", "svc")
        key_id = a.key("k", grant=svc)
        cred = a.call("POST", "/v1/principals/svc/sigv4-credentials", a.admin).json
        akid, secret = cred["access_key_id"], cred["secret_access_key"]
        assert _datakey(a, svc) == 200
        assert _aws_datakey(a.client, akid, secret, key_id) == 200
        assert b.call("POST", "/v1/principals/svc/disable", b.admin, json={}).status_code == 200

        def down() -> int:
            raise HsmUnavailable(detail="injected: the anchor cannot be read")

        services = one.extensions["kms"]
        with (
            mock.patch.object(services.principals, "_state_version", down),
            mock.patch.object(services.sigv4, "_state_version", down),
        ):
            # remembered (authenticated from the cache), refused at the key-use commit
            assert _datakey(a, svc) == 403
            assert _aws_datakey(a.client, akid, secret, key_id) != 200
            assert any("svc is disabled" in (x["detail"] or "") for x in a.audit())
            time.sleep(2.2)  # past KMS_AUTH_CACHE_SECONDS: nothing remembered any more
            assert _datakey(a, svc) in (401, 503)
            with pytest.raises(KmsError):
                services.principals.by_certificate_name("svc")


# == escrow: custodians and requesters ====================================================


@dataclasses.dataclass
class Escrow:
    api: Api
    clock: ManualClock
    services: Any
    police: dict[str, str]
    custodians: dict[str, tuple[dict[str, str], Ed25519PrivateKey]]
    blob: dict[str, Any]

    def file(self) -> str:
        body = {
            "legal_basis": "Court order 2026/117",
            "reference": "INV-2026-117",
            "justification": "legal_request",
            "scope": {"keys": ["records"], "context": {"patient": "p0"}},
            "max_unwraps": 2,
            "expires_in_seconds": 7 * 86400,
        }
        r = self.api.call("POST", "/v1/escrow/cases", self.police, json=body)
        assert r.status_code == 201, r.json
        return str(r.json["case_id"])

    def case(self, case_id: str) -> dict[str, Any]:
        r = self.api.call("GET", f"/v1/escrow/cases/{case_id}", self.api.admin)
        assert r.status_code == 200, r.json
        return dict(r.json)

    def decide(self, case_id: str, who: str, decision: str = "approve") -> Any:
        return escrow_support.decide(self.api, self.custodians, self.case(case_id), who, decision)

    def unwrap(self, case_id: str) -> Any:
        body = {
            "ciphertext": self.blob["ciphertext"],
            "context": {"patient": "p0"},
            "justification": "legal_request",
            "case_id": case_id,
        }
        return self.api.call("POST", "/v1/decrypt", self.police, json=body)

    def enrol(self, name: str, group: str, endorser: str) -> None:
        escrow_support.enrol(self.api, self.custodians, name, group, endorser)


@pytest.fixture
def esc(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, receiver: Receiver
) -> Escrow:
    """The keyholder's and a legal officer's approvals open a case; the data owner's
    custodian (group data_owner) may veto it during the waiting period."""
    clock = ManualClock()
    app = create_app(
        dataclasses.replace(
            settings,
            escrow_quorum=2,
            escrow_required_groups=frozenset({"keyholder", "legal"}),
            escrow_veto_groups=frozenset({"data_owner"}),
            escrow_groups=frozenset({"board"}),
            escrow_waiting_period_seconds=3600,
            escrow_approval_ttl_seconds=86400,
            escrow_webhook_url=receiver.url,
            escrow_webhook_secret=SECRET,
        ),
        hsm=hsm,
        storage=storage,
        clock=clock,
    )
    token = app.extensions["kms"].principals.bootstrap_admin("admin")
    assert token is not None
    api = Api(app.test_client(), token)
    svc = api.principal("service", "svc")
    api.key("records", grant=svc)
    blob = api.call(
        "POST", "/v1/keys/records/datakey", svc, json={"context": {"patient": "p0"}}
    ).json
    police = api.principal("requester", "police")
    custodians = {}
    pinned = (
        ("kh-officer", "keyholder"),
        ("legal", "legal"),
        ("dpo", "data_owner"),
        ("board-1", "board"),
    )
    for name, group in pinned:
        headers = api.principal("custodian", name)
        key = Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        assert app.extensions["kms"].custodians.pin_custodian(name, group, raw) is None
        custodians[name] = (headers, key)
    return Escrow(api, clock, app.extensions["kms"], police, custodians, blob)


def test_the_veto_works_without_any_lifecycle_step(esc: Escrow) -> None:
    """The baseline: the data owner's custodian rejects during the waiting period."""
    cid = esc.file()
    assert esc.decide(cid, "kh-officer").status_code == 201
    assert esc.decide(cid, "legal").json["state"] == "approved"
    esc.services.notifier.deliver_due()
    assert esc.decide(cid, "dpo", "reject").json["state"] == "rejected"
    esc.clock.advance(3601)
    assert esc.unwrap(cid).status_code == 403


@pytest.mark.parametrize("silence", ["disable", "revoke_tokens"])
def test_an_admin_cannot_silence_the_data_owners_veto_through_its_principal(
    esc: Escrow, silence: str
) -> None:
    # Was a HOLE, fixed: guarantee 18 refuses revoking the last active custodian of a veto group
    # ("the data owner would lose its veto"), but a custodian decides only through its
    # principal (EscrowService.decide: caller.require(CUSTODIAN), caller.name ==
    # custodian), and one admin may disable that principal or revoke its tokens, which
    # nothing refuses. The data owner's signed rejection is then answered 401, the
    # waiting period ends, and the case opens data the data owner contested. Fix: refuse
    # (409) disabling, or revoking the last token of, the principal of the last active
    # custodian of a group a policy requires or lets veto (as revoke_custodian does);
    # or accept a rejection on its Ed25519 signature alone.
    api = esc.api
    cid = esc.file()
    assert esc.decide(cid, "kh-officer").status_code == 201
    assert esc.decide(cid, "legal").json["state"] == "approved"
    esc.services.notifier.deliver_due()  # the data owner is told: the waiting period runs
    if silence == "disable":
        api.call("POST", "/v1/principals/dpo/disable", api.admin, json={})
    else:
        for tok in _tokens(api, "dpo"):
            api.call("DELETE", f"/v1/principals/dpo/tokens/{tok['token_id']}", api.admin)
    esc.decide(cid, "dpo", "reject")  # the data owner contests the case
    esc.clock.advance(3601)
    opened = esc.unwrap(cid)
    assert opened.status_code == 403, "the data owner's veto was silenced"
    assert esc.case(cid)["state"] == "rejected"


def test_an_admin_using_a_requesters_case_with_a_token_it_issued_is_told_apart(
    esc: Escrow,
) -> None:
    # Was a HOLE (attribution): an admin issued itself a token of the requester (documented:
    # "token issuance is an admin's word") and unwraps under the requester's approved,
    # active case, spending its budget. The issue is recorded under the admin, but the
    # unwrap's record names only the requester, and no record of a use says which token
    # made it (Caller carries no token id): the data owner cannot tell the admin's
    # unwraps from the requester's. (Unlike the documented route of a service principal
    # and a grant, this needs no grant and leaves no grant record.) Fix: record the
    # token id of the authenticating token in every record of a use (the Caller already
    # could carry it: authenticate_token returns it), or let no admin issue or rotate
    # tokens of requester and custodian principals.
    api = esc.api
    cid = esc.file()
    assert esc.decide(cid, "kh-officer").status_code == 201
    assert esc.decide(cid, "legal").json["state"] == "approved"
    esc.services.notifier.deliver_due()
    esc.clock.advance(3601)
    # fixed: an admin issues or rotates no token of a requester or custodian (403), so
    # only the requester's own tokens ever unwrap under its cases
    (own,) = api.call("GET", "/v1/principals/police/tokens", api.admin).json["tokens"]
    for path in (
        "/v1/principals/police/tokens",
        f"/v1/principals/police/tokens/{own['token_id']}/rotate",
        "/v1/principals/dpo/tokens",
    ):
        refused = api.call("POST", path, api.admin, json={})
        assert refused.status_code == 403, refused.json
        assert "rotated only by itself" in refused.json["error"]["message"]
    assert len(api.call("GET", "/v1/principals/police/tokens", api.admin).json["tokens"]) == 1


def test_a_disabled_custodian_or_requester_cannot_act(esc: Escrow) -> None:
    """A disabled custodian submits no decision; a disabled requester files no case and
    unwraps nothing under its active case (and one in flight is refused at commit)."""
    api = esc.api
    cid = esc.file()
    # legal is the last member of a required group: it cannot be cut off at all
    r = api.call("POST", "/v1/principals/legal/disable", api.admin, json={})
    assert r.status_code == 409 and "last active custodian" in r.json["error"]["message"]
    esc.enrol("legal-2", "legal", endorser="legal")
    assert api.call("POST", "/v1/principals/legal/disable", api.admin, json={}).status_code == 200
    assert esc.decide(cid, "legal").status_code == 401
    api.call("POST", "/v1/principals/legal/enable", api.admin, json={})
    assert esc.decide(cid, "kh-officer").status_code == 201
    assert esc.decide(cid, "legal").json["state"] == "approved"
    esc.services.notifier.deliver_due()
    esc.clock.advance(3601)
    police = esc.services.principals.authenticate(_token(esc.police))
    assert api.call("POST", "/v1/principals/police/disable", api.admin, json={}).status_code == 200
    assert esc.unwrap(cid).status_code == 401
    r = api.call("POST", "/v1/escrow/cases", esc.police, json={})
    assert r.status_code == 401
    request = DecryptRequest(
        base64.b64decode(esc.blob["ciphertext"]),
        {"patient": "p0"},
        justification="legal_request",
        case_id=cid,
    )
    try:
        result = esc.services.crypto.decrypt(Caller("in-flight", police), [request])
        opened = [x for x in result if not isinstance(x, KmsError)]
    except KmsError:
        opened = []
    assert opened == []
    api.call("POST", "/v1/principals/police/enable", api.admin, json={})
    assert esc.unwrap(cid).status_code == 200  # the case itself was untouched


def test_a_required_group_cannot_be_emptied_one_member_at_a_time(esc: Escrow) -> None:
    """With two members, revoking one is fine; the remaining (last active) one is
    protected, also when the other was revoked first (and revoked again); the veto group
    too; and a group only a key's policy needs, while that key is disabled or pending
    deletion (it may still come back into use)."""
    api = esc.api
    esc.enrol("kh-2", "keyholder", endorser="kh-officer")
    assert api.call("DELETE", "/v1/custodians/kh-officer", api.admin).status_code == 200
    assert api.call("DELETE", "/v1/custodians/kh-officer", api.admin).status_code in (200, 409)
    assert api.call("DELETE", "/v1/custodians/kh-2", api.admin).status_code == 409
    assert api.call("DELETE", "/v1/custodians/dpo", api.admin).status_code == 409
    assert api.call("POST", "/v1/keys", api.admin, json={"alias": "extra"}).status_code == 201
    policy = {"quorum": 2, "required_groups": ["board"], "veto_groups": []}
    r = api.call("POST", "/v1/keys/extra/escrow-policy", api.admin, json=policy)
    assert r.status_code == 200, r.json
    assert api.call("DELETE", "/v1/custodians/board-1", api.admin).status_code == 409
    assert api.call("POST", "/v1/keys/extra/disable", api.admin, json={}).status_code == 200
    assert api.call("DELETE", "/v1/custodians/board-1", api.admin).status_code == 409
    r = api.call("POST", "/v1/keys/extra/schedule-deletion", api.admin, json={"pending_days": 7})
    assert r.status_code == 200, r.json
    assert api.call("DELETE", "/v1/custodians/board-1", api.admin).status_code == 409


# == bad input on every new endpoint ======================================================

_ID = "0123456789abcdef"
BAD = [
    ("POST", "/v1/principals/svc/disable", b"not json", 400),
    ("POST", "/v1/principals/svc/disable", b'{"a": ' + b"[" * 50000 + b"]" * 50000 + b"}", 400),
    ("POST", "/v1/principals/svc/enable", b"[1]", 400),
    ("POST", "/v1/principals/svc/enable", b'{"x": "' + b"a" * (9 * 1024 * 1024) + b'"}', 413),
    ("POST", "/v1/principals/svc/enable", b"\xff\xfe\x00", 400),
    ("POST", "/v1/principals/%E2%80%AEsvc/disable", b"{}", 400),
    ("POST", "/v1/principals/svc%00/disable", b"{}", 400),
    ("POST", "/v1/principals/%C3%A9t%C3%A9/disable", b"{}", 400),
    ("POST", "/v1/principals/..%2F..%2Fetc/disable", b"{}", 404),
    ("POST", "/v1/principals/.hidden/disable", b"{}", 400),
    ("POST", "/v1/principals/" + "a" * 65 + "/disable", b"{}", 400),
    ("GET", "/v1/principals/svc/tokens?x=%00", None, 400),
    ("PUT", "/v1/principals/svc/tokens", b"{}", 405),
    ("DELETE", "/v1/principals/svc/tokens/ABCDEF0123456789", None, 400),
    ("DELETE", "/v1/principals/svc/tokens/%D9%A0%D9%A1%D9%A2%D9%A30123456789ab", None, 400),
    ("DELETE", f"/v1/principals/svc/tokens/{_ID}%0a", None, 400),
    ("DELETE", f"/v1/principals/svc/tokens/{_ID}0", None, 400),
    ("DELETE", "/v1/principals/svc/tokens/..%2F..%2Fadmin", None, 404),
    ("POST", f"/v1/principals/svc/tokens/{_ID}/rotate", b'{"grace_seconds": -1}', 400),
    ("POST", f"/v1/principals/svc/tokens/{_ID}/rotate", b'{"grace_seconds": 1.5}', 400),
    ("POST", f"/v1/principals/svc/tokens/{_ID}/rotate", b'{"grace_seconds": null}', 400),
    ("POST", f"/v1/principals/svc/tokens/{_ID}/rotate", b'{"grace_seconds": "600"}', 400),
    ("POST", f"/v1/principals/svc/tokens/{_ID}/rotate", b'{"ttl_seconds": NaN}', 400),
    ("POST", "/v1/principals/svc/tokens", b'{"ttl_seconds": Infinity}', 400),
    ("POST", "/v1/principals/svc/tokens", b'{"ttl_seconds": ' + b"9" * 5000 + b"}", 400),
    ("POST", "/v1/principals/svc/tokens", b'{"ttl_seconds": -60}', 400),
    ("POST", "/v1/principals/svc/tokens", b'{"ttl_seconds": 60, "ttl_seconds": "x"}', 400),
    ("POST", "/v1/principals/svc/tokens", b'{"rotate": "' + _ID.encode() + b'"}', 400),
    ("POST", "/v1/principals/svc/sessions/end", b'{"since": "1970-01-01"}', 400),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), BAD)
def test_bad_input_is_a_specific_4xx_and_changes_nothing(
    api: Api, method: str, path: str, body: bytes | None, status: int
) -> None:
    svc = api.principal("service", "svc")
    before = (api.call("GET", "/v1/principals", api.admin).json, _tokens(api, "svc"))
    headers = {**api.admin, "Content-Type": "application/json"}
    r = api.call(method, path, headers, data=body)
    assert r.status_code == status, r.get_data(as_text=True)[:300]
    assert r.mimetype == "application/json"
    assert r.json["error"]["code"] and r.json["error"]["message"]
    after = (api.call("GET", "/v1/principals", api.admin).json, _tokens(api, "svc"))
    assert after == before
    assert _datakey(api, svc) in (403, 404)  # still authenticates, changed nothing


def test_a_token_id_of_another_principal_is_not_found_under_this_name(api: Api) -> None:
    """An admin naming the admin's own token id under another principal's name (revoke,
    rotate) gets 404; the token is untouched."""
    api.principal("service", "svc")
    (mine,) = _tokens(api, "admin")
    for method, suffix in (("DELETE", ""), ("POST", "/rotate")):
        r = api.call(
            method, f"/v1/principals/svc/tokens/{mine['token_id']}{suffix}", api.admin, json={}
        )
        assert r.status_code == 404, r.json
    (still,) = _tokens(api, "admin")
    assert (still["token_id"], still["expires_at"]) == (mine["token_id"], mine["expires_at"])
    assert api.call("GET", "/v1/principals", api.admin).status_code == 200


@pytest.mark.parametrize(
    ("path", "form"),
    [
        ("/dashboard/principals/..%2Fadmin", None),
        ("/dashboard/principals/%00", None),
        ("/dashboard/principals/" + "x" * 300, None),
        ("/dashboard/principals/svc/tokens/ZZZ/revoke", {"confirm": "yes"}),
        ("/dashboard/principals/svc/tokens/" + _ID + "/revoke", {"confirm": "yes"}),
        ("/dashboard/principals/nobody/disable", {"confirm": "yes"}),
        ("/dashboard/principals/admin/disable", {"confirm": "yes"}),
    ],
)
def test_bad_dashboard_principal_requests_are_4xx_pages(
    api: Api, path: str, form: dict[str, str] | None
) -> None:
    api.principal("service", "svc")
    csrf = _dashboard_login(api.client, _token(api.admin))
    before = (api.call("GET", "/v1/principals", api.admin).json, _tokens(api, "svc"))
    if form is None:
        r = api.client.get(path, **HTTPS)
    else:
        r = api.client.post(path, data={"csrf_token": csrf, **form}, **HTTPS)
    assert 400 <= r.status_code < 500, (r.status_code, r.get_data(as_text=True)[:300])
    after = (api.call("GET", "/v1/principals", api.admin).json, _tokens(api, "svc"))
    assert after == before
