"""The same situation through the native face and the XKS face is refused identically:
the same rule decides (kms/services/key_use.py), so the audit records carry the same
outcome and reason, whichever face the request came through. Real SoftHSM, real SQLite,
XKS requests signed by botocore."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.functional.test_xks import Xks, issue, xapi, xapp, xks_settings  # noqa: F401
from tests.helpers import Api, b64

SERVICE = "svc"


def _grant(api: Api, key: str, ops: list[str], codes: list[str] | None = None) -> None:
    body: dict[str, Any] = {"principal": SERVICE, "operations": ops}
    if codes is not None:
        body["justifications"] = codes
    assert api.call("POST", f"/v1/keys/{key}/grants", api.admin, json=body).status_code == 200


def _disable(api: Api) -> None:
    api.call("POST", "/v1/keys/k/disable", api.admin)


def _revoke(api: Api) -> None:
    _grant(api, "k", ["datakey", "xks_encrypt"])


def _narrow_justifications(api: Api) -> None:
    _grant(api, "k", ["datakey", "decrypt", "xks_encrypt", "xks_decrypt"], ["customer_initiated"])


def _retire(api: Api) -> None:
    api.call("POST", "/v1/keys/k/rotate", api.admin)
    r = api.call("POST", "/v1/keys/k/config", api.admin, json={"min_decryption_version": 2})
    assert r.status_code == 200, r.json


SITUATIONS: dict[str, Callable[[Api], None]] = {
    "key disabled": _disable,
    "grant revoked": _revoke,
    "justification not granted": _narrow_justifications,
    "version retired": _retire,
}


@pytest.mark.parametrize("situation", sorted(SITUATIONS))
def test_the_native_and_xks_faces_refuse_identically(xapi: Api, situation: str) -> None:  # noqa: F811
    svc = xapi.principal("service", SERVICE)
    xapi.key("k")
    _grant(xapi, "k", ["datakey", "decrypt", "xks_encrypt", "xks_decrypt"])
    xks = Xks(xapi.client, *issue(xapi, SERVICE))
    blob = xapi.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    sealed = xks.encrypt("k", b"secret")
    assert sealed.status_code == 200
    assert xapi.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob}).status_code == 200
    assert xks.decrypt("k", sealed.json).status_code == 200

    SITUATIONS[situation](xapi)
    native = xapi.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob})
    through_xks = xks.decrypt("k", sealed.json)

    assert native.status_code in (403, 409) and "plaintext" not in native.json
    assert through_xks.status_code in (400, 403) and "plaintext" not in through_xks.json
    records = xapi.audit()
    native_record = next(r for r in records if r["request_id"] == native.headers["X-Request-Id"])
    xks_record = records[-1]
    assert xks_record["operation"] == "xks_decrypt"
    assert native_record["outcome"] == xks_record["outcome"] == native.json["error"]["code"]
    # The XKS detail starts with the request metadata; the reason follows " | ".
    assert xks_record["detail"].rsplit(" | ", 1)[1] == native_record["detail"]


def test_a_native_grant_opens_nothing_through_xks_and_the_other_way(xapi: Api) -> None:  # noqa: F811
    svc = xapi.principal("service", SERVICE)
    xapi.key("k")
    _grant(xapi, "k", ["datakey", "xks_encrypt"])
    xks = Xks(xapi.client, *issue(xapi, SERVICE))
    blob = xapi.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    sealed = xks.encrypt("k", b"secret")
    _grant(xapi, "k", ["decrypt"])  # native only
    assert xapi.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob}).status_code == 200
    assert xks.decrypt("k", sealed.json).status_code == 403
    _grant(xapi, "k", ["xks_decrypt"])  # XKS only
    assert xks.decrypt("k", sealed.json).status_code == 200
    refused = xapi.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob})
    assert refused.status_code == 403 and refused.json["error"]["code"] == "forbidden"
    assert b64(b"secret") not in refused.get_data(as_text=True)


def _set_policy(api: Api, **policy: Any) -> None:
    r = api.call("POST", "/v1/keys/k/xks", api.admin, json=policy)
    assert r.status_code == 200, r.json


@pytest.mark.parametrize(
    "change",
    ["grant row deleted in the database", "xks policy", "key disabled in the database"],
)
def test_an_xks_decrypt_admitted_from_the_cache_is_refused_at_commit(
    xapi: Api,  # noqa: F811
    db_path: Path,
    change: str,
) -> None:
    """The worker caches the rows an XKS decrypt was admitted with (no read transaction
    for the next one); a change made since, even straight into the database behind the
    server's back, is decided again at commit: refused, audited once, no plaintext."""
    xapi.principal("service", SERVICE)
    key_id = xapi.key("k")
    _grant(xapi, "k", ["xks_encrypt", "xks_decrypt"])
    xks = Xks(xapi.client, *issue(xapi, SERVICE))
    sealed = xks.encrypt("k", b"secret").json
    assert xks.decrypt("k", sealed).status_code == 200  # admitted, rows cached
    assert xks.decrypt("k", sealed).status_code == 200  # from the cache
    if change == "xks policy":
        _set_policy(xapi, aws_principals=["arn:aws:iam::999999999999:*"])
    else:
        with sqlite3.connect(db_path) as db:
            if change.startswith("grant"):
                db.execute("DELETE FROM grants WHERE key_id = ?", (key_id,))
            else:
                db.execute("UPDATE keys SET state = 'disabled' WHERE key_id = ?", (key_id,))
    refused = xks.decrypt("k", sealed)
    # no grant left at all: the answer of a key that does not exist (KeyNotFoundException)
    assert refused.status_code in (400, 403, 404), refused.json
    assert "plaintext" not in refused.json
    records = [r for r in xapi.audit() if r["operation"] == "xks_decrypt"]
    assert [r["outcome"] for r in records][:2] == ["ok", "ok"] and len(records) == 3
    assert records[-1]["outcome"] in ("forbidden", "key_state")
