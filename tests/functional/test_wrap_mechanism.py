"""The key-wrap mechanism recorded with each wrapped KEK (issue 20, migration 0013), with
the real SoftHSM token and SQLite: a database writer who changes it gets the ordinary
refusal, as for any sealed field; rows sealed before mechanisms were recorded keep their
seals through the migration and stay usable."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from kms import config
from kms.app import create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage, make_engine, upgrade
from kms.services.model import LEGACY_WRAP_MECHANISM, Key, KeyState, Role
from kms.services.seals import RowSeals
from tests.helpers import Api, anchored, b64


def _encrypt(api: Api, svc: dict[str, str], key_id: str) -> tuple[int, str]:
    r = api.call("POST", f"/v1/keys/{key_id}/encrypt", svc, json={"plaintext": b64(b"x")})
    return r.status_code, (
        r.json["ciphertext"] if r.status_code == 200 else r.json["error"]["code"]
    )


@pytest.mark.parametrize("mechanism", ["CKM_AES_KEY_WRAP_KWP", "0x80000171"])
def test_a_wrap_mechanism_edited_in_the_database_gets_the_ordinary_refusal(
    api: Api, storage: SqlStorage, mechanism: str
) -> None:
    svc = api.principal("service")
    key_id = api.key(grant=svc, ops=("encrypt", "decrypt"))
    edit = sa.text("UPDATE key_versions SET wrap_mechanism = :m WHERE key_id = :k")
    with storage.transaction() as tx:  # the database writer
        tx._c.execute(edit, {"m": mechanism, "k": key_id})
    assert _encrypt(api, svc, key_id) == (403, "forbidden")
    record = api.audit()[-1]
    assert (record["operation"], record["outcome"]) == ("encrypt", "forbidden")
    assert f"the seal of the key_version row {key_id},1 does not verify" in record["detail"]

    # the row's seal is the one it was made with: the mechanism put back, it verifies again
    with storage.transaction() as tx:
        tx._c.execute(edit, {"m": LEGACY_WRAP_MECHANISM, "k": key_id})
    status, blob = _encrypt(api, svc, key_id)
    assert status == 200
    r = api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob})
    assert (r.status_code, r.json["plaintext"]) == (200, b64(b"x"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_rows_sealed_at_0012_keep_their_seals_after_0013(
    tmp_path: Path, hsm: Pkcs11Hsm, settings: config.Settings
) -> None:
    """A key version and a SigV4 credential written and sealed by a 0012 server, with the
    sealed fields of then (no mechanism), verify after the upgrade and the key is usable."""
    engine = make_engine(f"sqlite:///{tmp_path / 'kms.sqlite3'}", "NORMAL")
    upgrade(engine, target="0012")
    storage = SqlStorage(engine, RowSeals(hsm))
    key_id, now = str(uuid.uuid4()), datetime.now(UTC)
    kek = hsm.new_wrapped_kek()
    assert kek.wrap_mechanism == LEGACY_WRAP_MECHANISM  # what a 0012 server wrapped with
    admin_token = "kms_" + secrets.token_urlsafe(32)
    with anchored(storage, hsm):
        with storage.transaction() as tx:  # as the 0012 server wrote them
            tx.add_key(Key(key_id, None, "", KeyState.ENABLED, 1, now, rotated_at=now))
            old_version_fields = {
                "key_id": key_id,
                "version": 1,
                "wrapped_sha256": _sha256(kek.wrapped),
                "root_label": kek.root_label,
            }
            version_seal = tx._seals.seal("key_version", old_version_fields)
            tx._c.execute(
                sa.text(
                    "INSERT INTO key_versions (key_id, version, wrapped_kek, root_label,"
                    " created_at, seal) VALUES (:k, 1, :w, :r, :t, :seal)"
                ),
                {
                    "k": key_id,
                    "w": kek.wrapped,
                    "r": kek.root_label,
                    "t": now,
                    "seal": version_seal,
                },
            )
            tx.add_principal("admin", Role.ADMIN, _sha256(admin_token.encode()), now)
            owner = tx.add_principal("aws-12", Role.SERVICE, "e" * 64, now)
            old_credential_fields = {
                "access_key_id": "AKID0012SEALED",
                "principal_id": owner.id,
                "state": "active",
                "sealed_secret_sha256": _sha256(b"s"),
                "wrapped_kek_sha256": _sha256(b"w"),
                "root_label": "kms-root",
            }
            credential_seal = tx._seals.seal("sigv4_credential", old_credential_fields)
            tx._c.execute(
                sa.text(
                    "INSERT INTO sigv4_credentials (access_key_id, principal_id, sealed_secret,"
                    " wrapped_kek, root_label, state, created_at, seal) VALUES"
                    " ('AKID0012SEALED', :p, :s, :w, 'kms-root', 'active', 't0', :seal)"
                ),
                {"p": owner.id, "s": b"s", "w": b"w", "seal": credential_seal},
            )
        upgrade(engine)

        with storage.reader() as tx:
            version = tx.key_version(key_id, 1)
            credential = tx.sigv4_credential("AKID0012SEALED")
            seals = tx._c.execute(
                sa.text(
                    "SELECT (SELECT seal FROM key_versions), (SELECT seal FROM sigv4_credentials)"
                )
            ).one()
        assert version is not None and version.wrap_mechanism == LEGACY_WRAP_MECHANISM
        assert credential is not None and credential.wrap_mechanism == LEGACY_WRAP_MECHANISM
        assert tuple(seals) == (version_seal, credential_seal)  # nothing was re-sealed

        api = Api(create_app(settings, hsm=hsm, storage=storage).test_client(), admin_token)
        svc = api.principal("service")
        grant = {"principal": svc["X-Name"], "operations": ["encrypt", "decrypt"]}
        r = api.call("POST", f"/v1/keys/{key_id}/grants", api.admin, json=grant)
        assert r.status_code == 200, r.json
        status, blob = _encrypt(api, svc, key_id)
        assert status == 200
        r = api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob})
        assert (r.status_code, r.json["plaintext"]) == (200, b64(b"x"))
    engine.dispose()
