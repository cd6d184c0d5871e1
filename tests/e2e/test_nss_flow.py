"""Issue 20, "Real HSMs": the whole flow through real gunicorn servers on a second PKCS#11
implementation, NSS softokn behind p11-kit's proxy (tests/nss_token.py). ``kms init`` and
``kms serve`` run through ``NssToken.command`` (as root: an unprivileged user namespace,
where p11-kit reads the token's configuration). Then a change of wrap mechanism: NSS's
CKM_AES_KEY_WRAP_PAD (RFC 3394 over PKCS#7, another format than _KWP's RFC 5649) wraps the
KEKs made afterwards; every KEK keeps the mechanism it was recorded with."""

from __future__ import annotations

import base64
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kms.client import KmsClient
from tests.e2e.test_xks_conformance import REGION, decrypt_body, encrypt_body
from tests.helpers import Server, b64, gunicorn_server, unb64
from tests.nss_token import NssToken, make_nss_token

pytestmark = pytest.mark.e2e

KWP, PAD = "CKM_AES_KEY_WRAP_KWP", "CKM_AES_KEY_WRAP_PAD"
CONTEXT = {"patient": "p-1"}


def kms_on_token(token: NssToken, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``kms`` command, run so that p11-kit in it sees ``token``."""
    return subprocess.run(
        token.command(sys.executable, "-m", "kms", *args),
        capture_output=True,
        text=True,
        env=token.run_env(),
        timeout=180,
        check=False,
    )


def init_args(token: NssToken, data_dir: Path, pin_file: Path | None = None) -> list[str]:
    return [
        "init",
        "--data-dir",
        str(data_dir),
        "--single-operator",
        "--pkcs11-module",
        token.module_path,
        "--token-label",
        token.token_label,
        "--pin-file",
        str(pin_file or token.pin_file),
        "--hsm-profile",
        "nss",
    ]


@dataclass
class Nss:
    token: NssToken
    data_dir: Path

    def server(self, **env: str) -> Any:
        """``kms serve`` on this data directory and token (``env``: extra settings)."""
        return gunicorn_server(
            self.data_dir, workers=2, env={**self.token.env, **env}, wrap=self.token.command
        )


@pytest.fixture(scope="module")
def nss(tmp_path_factory: pytest.TempPathFactory) -> Nss:
    """An NSS token and a data directory initialised on it by the real ``kms init``."""
    token = make_nss_token(tmp_path_factory.mktemp("nss-token"))
    data = tmp_path_factory.mktemp("nss-data") / "data"
    done = kms_on_token(token, *init_args(token, data))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kms-root" in done.stdout and "control policy" in done.stdout, done.stdout
    return Nss(token, data)


class Service:
    """A service principal with its grants on one key, over the native API."""

    def __init__(self, server: Server, key: str) -> None:
        admin = KmsClient(server.url, server.admin_token)
        name = f"svc-{uuid.uuid4().hex[:8]}"
        self.token = admin.create_principal(name, "service")["token"]
        admin.create_key(key)
        admin.grant(key, name, ["datakey", "encrypt", "decrypt", "rewrap"])
        self.key_id = str(admin.get_key(key)["key_id"])

    def client(self, server: Server) -> KmsClient:
        return KmsClient(server.url, self.token)

    @staticmethod
    def admin(server: Server) -> KmsClient:
        return KmsClient(server.url, server.admin_token)

    def rewrap(self, server: Server, blob: bytes) -> dict[str, Any]:
        r = requests.post(
            server.url + "/v1/rewrap",
            json={"ciphertext": b64(blob), "context": CONTEXT},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return dict(r.json())


def xks(server: Server, credential: dict[str, str], target: str, body: str) -> dict[str, Any]:
    """A SigV4-signed XKS proxy call (no URI prefix configured); its JSON answer."""
    url = f"{server.url}/kms/xks/v1/{target}"
    request = AWSRequest(
        "POST", url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    creds = Credentials(credential["access_key_id"], credential["secret_access_key"])
    SigV4Auth(creds, "kms-xks-proxy", REGION).add_auth(request)
    r = requests.post(url, data=body.encode(), headers=dict(request.headers.items()), timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def wrap_mechanisms(data_dir: Path, key_id: str) -> dict[int, str]:
    """The mechanism each version of ``key_id`` records, from the database itself."""
    with sqlite3.connect(data_dir / "kms.sqlite3") as db:
        rows = db.execute(
            "SELECT version, wrap_mechanism FROM key_versions WHERE key_id = ?", (key_id,)
        ).fetchall()
    return {int(version): str(mechanism) for version, mechanism in rows}


def test_the_whole_flow_on_nss_softokn(nss: Nss, tmp_path: Path) -> None:
    with nss.server() as srv:
        svc = Service(srv, "nss-records")
        client = svc.client(srv)
        key_id = svc.key_id
        # datakey, decrypt
        dk = client.datakey("nss-records", CONTEXT)
        assert dk.plaintext is not None and len(dk.plaintext) == 32
        assert client.decrypt(dk.ciphertext, CONTEXT) == dk.plaintext
        # encrypt, decrypt
        sealed = client.encrypt("nss-records", b"diagnosis: fine", CONTEXT)
        assert client.decrypt(sealed, CONTEXT) == b"diagnosis: fine"
        # rewrap
        rewrapped = unb64(svc.rewrap(srv, sealed)["ciphertext"])
        assert rewrapped != sealed and client.decrypt(rewrapped, CONTEXT) == b"diagnosis: fine"
        # rotate; the version-1 blobs still decrypt, new ones use version 2
        assert svc.admin(srv).key_action("nss-records", "rotate")["current_version"] == 2
        assert client.decrypt(dk.ciphertext, CONTEXT) == dk.plaintext
        assert client.decrypt(sealed, CONTEXT) == b"diagnosis: fine"
        after = client.encrypt("nss-records", b"after rotation", CONTEXT)
        assert client.datakey("nss-records", CONTEXT).key_version == 2
        # the XKS face: a principal with a SigV4 credential, an XKS key, a round trip
        admin = svc.admin(srv)
        admin.create_principal("aws-xks-nss", "service")
        admin.create_key("xks-nss")
        admin.grant("xks-nss", "aws-xks-nss", ["xks_encrypt", "xks_decrypt"])
        admin.call("POST", "/v1/keys/xks-nss/xks", {"usage": ["encrypt", "decrypt"]})
        credential = admin.call("POST", "/v1/principals/aws-xks-nss/sigv4-credentials")
        plaintext = base64.b64encode(b"xks on nss").decode()
        aad = base64.b64encode(b"project=nss").decode()
        xks_sealed = xks(srv, credential, "keys/xks-nss/encrypt", encrypt_body(plaintext, aad))
        opened = xks(srv, credential, "keys/xks-nss/decrypt", decrypt_body(xks_sealed, aad))
        assert opened["plaintext"] == plaintext
        # a signed checkpoint, and the audit chain verified offline with the public key
        srv.kms("audit", "checkpoint")
        _, report = srv.export_and_verify(tmp_path)
        assert report
        assert wrap_mechanisms(nss.data_dir, key_id) == {1: KWP, 2: KWP}

    # stopped; a new server on the same token and database decrypts everything again
    with nss.server() as again:
        client = svc.client(again)
        assert client.decrypt(dk.ciphertext, CONTEXT) == dk.plaintext
        assert client.decrypt(sealed, CONTEXT) == b"diagnosis: fine"
        assert client.decrypt(rewrapped, CONTEXT) == b"diagnosis: fine"
        assert client.decrypt(after, CONTEXT) == b"after rotation"
        opened = xks(again, credential, "keys/xks-nss/decrypt", decrypt_body(xks_sealed, aad))
        assert opened["plaintext"] == plaintext
        again.kms("audit", "checkpoint")
        (tmp_path / "again").mkdir()
        again.export_and_verify(tmp_path / "again")


def test_a_change_of_wrap_mechanism_keeps_older_keks_readable(nss: Nss) -> None:
    with nss.server() as srv:  # the nss profile: _KWP
        svc = Service(srv, "nss-profile")
        key_id = svc.key_id
        before_dk = svc.client(srv).datakey("nss-profile", CONTEXT)
        before = svc.client(srv).encrypt("nss-profile", b"wrapped with KWP", CONTEXT)
    assert wrap_mechanisms(nss.data_dir, key_id) == {1: KWP}

    with nss.server(KMS_HSM_WRAP_MECHANISM=PAD) as srv:  # NSS _PAD: RFC 3394 + PKCS#7
        client = svc.client(srv)
        assert client.decrypt(before, CONTEXT) == b"wrapped with KWP"  # v1 unwrapped with KWP
        assert svc.admin(srv).key_action("nss-profile", "rotate")["current_version"] == 2
        after = client.encrypt("nss-profile", b"wrapped with PAD", CONTEXT)
        after_dk = client.datakey("nss-profile", CONTEXT)
        assert after_dk.key_version == 2
        for blob, expected in (
            (before, b"wrapped with KWP"),
            (before_dk.ciphertext, before_dk.plaintext),
            (after, b"wrapped with PAD"),
            (after_dk.ciphertext, after_dk.plaintext),
        ):
            assert client.decrypt(blob, CONTEXT) == expected
    assert wrap_mechanisms(nss.data_dir, key_id) == {1: KWP, 2: PAD}

    # back on the profile's _KWP: the version wrapped with _PAD is unwrapped with _PAD
    with nss.server() as srv:
        client = svc.client(srv)
        assert client.decrypt(after, CONTEXT) == b"wrapped with PAD"
        assert client.decrypt(before, CONTEXT) == b"wrapped with KWP"


def test_init_with_a_wrong_pin_on_nss_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "token").mkdir()
    token = make_nss_token(tmp_path / "token")
    wrong = tmp_path / "wrong.pin"
    wrong.touch(mode=0o600)
    wrong.write_text("not-" + token.pin)
    data = tmp_path / "data"
    done = kms_on_token(token, *init_args(token, data, wrong))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, done.stdout + done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "hsm_preflight_failed" in lines[0] and "login:" in lines[0], lines[0]
    assert "PIN" in lines[0], lines[0]
    assert not (data / "kms.sqlite3").exists() and not (data / "admin.token").exists()
