"""Mutual TLS against a live gunicorn (2 workers) with certificates made here: a test CA
that signs the server's and the clients' certificates, another CA that nobody trusts.

The client certificate's subject CN names the principal (kms/api/peer.py); gunicorn
refuses any handshake without a valid certificate from the configured CA.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.helpers import Server, free_port, gunicorn_server, init_data_dir, run_kms, write_pem

pytestmark = pytest.mark.e2e

NOW = datetime.now(UTC)


@dataclass
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path

    @classmethod
    def make(cls, directory: Path, name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        path = directory / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key, path)

    def issue(
        self,
        directory: Path,
        cn: str | None,
        *,
        usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
        expired: bool = False,
        server: bool = False,
        file_name: str | None = None,
    ) -> tuple[str, str]:
        """A certificate and its key (files, key chmod 600) signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "data owner")]
        if cn is not None:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        start, end = (
            (NOW - timedelta(days=10), NOW - timedelta(days=1))
            if expired
            else (NOW - timedelta(hours=1), NOW + timedelta(days=1))
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        stem = directory / (file_name or f"{cn}-{'expired' if expired else 'valid'}")
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        write_pem(cert, cert_path, key, key_path)
        return str(cert_path), str(key_path)


@dataclass
class Setup:
    server: Server
    ca: Path
    certs: dict[str, tuple[str, str]]
    tokens: dict[str, str]

    def call(
        self, method: str, path: str, cert: str | None, token: str | None = None, **kw: Any
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(
            method,
            self.server.url + path,
            cert=self.certs[cert] if cert else None,
            verify=str(self.ca),
            headers=headers,
            timeout=30,
            **kw,
        )

    def handshake(self, cert: str | None) -> str:
        """Open a TLS connection with ``cert`` (or none) and send one request: the HTTP
        status line if the server answered, else the TLS error the client saw."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            context.load_cert_chain(*self.certs[cert])
        port = int(self.server.url.rsplit(":", 1)[1])
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                answer = tls.recv(4096)
        except (ssl.SSLError, ConnectionError) as e:
            return f"refused: {e}"
        return answer.split(b"\r\n", 1)[0].decode() if answer else "refused: closed"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A server requiring client certificates from the test CA; principals ``admin``
    (made by kms init), ``svc-mtls`` and ``other-svc`` (services granted key ``k``)."""
    tls = tmp_path_factory.mktemp("pki")
    ca, rogue = Ca.make(tls, "test-ca"), Ca.make(tls, "rogue-ca")
    server_cert, server_key = ca.issue(
        tls, "localhost", usage=ExtendedKeyUsageOID.SERVER_AUTH, server=True
    )
    certs = {
        "admin": ca.issue(tls, "admin"),
        "svc": ca.issue(tls, "svc-mtls"),
        "off": ca.issue(tls, "svc-off"),
        "expired": ca.issue(tls, "svc-mtls", expired=True),
        "rogue": rogue.issue(tls, "svc-mtls", file_name="rogue-svc-mtls"),
        "stranger": ca.issue(tls, "nobody-by-this-name"),
        "no-cn": ca.issue(tls, None, file_name="no-cn"),
        "server-usage": ca.issue(
            tls, "svc-mtls", usage=ExtendedKeyUsageOID.SERVER_AUTH, file_name="server-usage"
        ),
    }
    data = init_data_dir(tmp_path_factory.mktemp("mtls-data"))
    env = {
        "KMS_TLS_CERT_FILE": server_cert,
        "KMS_TLS_KEY_FILE": server_key,
        "KMS_TLS_CLIENT_CA_FILE": str(ca.path),
    }
    with gunicorn_server(
        data, env=env, tls={"verify": str(ca.path), "cert": certs["admin"]}
    ) as server:
        s = Setup(server, ca.path, certs, {})
        for name in ("svc-mtls", "other-svc", "svc-off"):  # the admin, by its certificate
            r = s.call("POST", "/v1/principals", "admin", json={"name": name, "role": "service"})
            assert r.status_code == 201, r.text
            s.tokens[name] = r.json()["token"]
        assert s.call("POST", "/v1/keys", "admin", json={"alias": "k"}).status_code == 201
        for name in ("svc-mtls", "other-svc", "svc-off"):
            grant = {"principal": name, "operations": ["datakey", "decrypt"]}
            assert s.call("POST", "/v1/keys/k/grants", "admin", json=grant).status_code == 200
        yield s


def _record(s: Setup, request_id: str) -> dict[str, Any]:
    r = s.call("GET", "/v1/audit?after=0&limit=1000", "admin")
    assert r.status_code == 200, r.text
    (record,) = [x for x in r.json()["records"] if x["request_id"] == request_id]
    return dict(record)


def test_valid_client_certificate_is_the_principal_without_a_token(setup: Setup) -> None:
    dk = setup.call("POST", "/v1/keys/k/datakey", "svc", json={"context": {"a": "1"}})
    assert dk.status_code == 200, dk.text
    blob = dk.json()["ciphertext"]
    back = setup.call(
        "POST", "/v1/decrypt", "svc", json={"ciphertext": blob, "context": {"a": "1"}}
    )
    assert back.status_code == 200 and back.json()["plaintext"] == dk.json()["plaintext"]
    record = _record(setup, back.headers["X-Request-Id"])
    assert record["principal"] == "svc-mtls" and record["outcome"] == "ok"
    assert record["operation"] == "decrypt"


def test_role_and_grants_apply_to_a_certificate_principal(setup: Setup) -> None:
    r = setup.call("POST", "/v1/keys", "svc", json={"alias": "not-mine"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    record = _record(setup, r.headers["X-Request-Id"])  # audited like a token caller
    assert record["principal"] == "svc-mtls" and record["outcome"] == "forbidden"


def test_a_disabled_principal_is_refused_by_its_certificate_until_enabled(
    setup: Setup,
) -> None:
    assert setup.call("POST", "/v1/keys/k/datakey", "off", json={}).status_code == 200
    off = setup.call("POST", "/v1/principals/svc-off/disable", "admin", json={})
    assert off.status_code == 200 and off.json()["state"] == "disabled"
    refused = setup.call("POST", "/v1/keys/k/datakey", "off", json={})
    assert refused.status_code == 401  # the certificate is still valid; the principal is not
    assert setup.call("POST", "/v1/principals/svc-off/enable", "admin", json={}).status_code == 200
    assert setup.call("POST", "/v1/keys/k/datakey", "off", json={}).status_code == 200


def test_token_and_certificate_must_name_the_same_principal(setup: Setup) -> None:
    same = setup.call("POST", "/v1/keys/k/datakey", "svc", setup.tokens["svc-mtls"], json={})
    assert same.status_code == 200
    other = setup.call("POST", "/v1/keys/k/datakey", "svc", setup.tokens["other-svc"], json={})
    assert other.status_code == 401 and other.json()["error"]["code"] == "unauthenticated"
    bad = setup.call("POST", "/v1/keys/k/datakey", "svc", "kms_not-a-token", json={})
    assert bad.status_code == 401
    basic = setup.call("POST", "/v1/keys/k/datakey", "svc", json={}, auth=("u", "p"))
    assert basic.status_code == 401  # a credential that cannot be checked is not ignored
    assert "Traceback" not in setup.server.log_text()


@pytest.mark.parametrize("cert", ["stranger", "no-cn"])
def test_certificate_naming_no_principal_is_401(setup: Setup, cert: str) -> None:
    r = setup.call("POST", "/v1/keys/k/datakey", cert, json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    # a token of a real principal does not rescue a certificate naming someone else
    r = setup.call("POST", "/v1/keys/k/datakey", cert, setup.tokens["svc-mtls"], json={})
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("cert", "alert"),
    [
        ("expired", "certificate expired"),
        ("rogue", "unknown ca"),
        (None, "certificate required"),
        ("server-usage", "unsupported certificate"),
    ],
)
def test_handshake_is_refused(setup: Setup, cert: str | None, alert: str) -> None:
    outcome = setup.handshake(cert)
    assert outcome.startswith("refused") and alert in outcome.lower(), outcome
    assert setup.handshake("svc").startswith("HTTP/1.1 200")  # the server is fine
    # and the refused client cannot get anything through requests either
    with pytest.raises(requests.exceptions.RequestException):
        setup.call("GET", "/v1/keys", cert, setup.tokens["svc-mtls"])


def test_refused_handshakes_leave_no_traceback(setup: Setup) -> None:
    for cert in ("expired", "rogue", None):
        setup.handshake(cert)
    log = setup.server.log_text()
    assert "Traceback" not in log and "Error handling request" not in log


def test_bad_client_ca_setting_is_one_clear_line(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "data")
    ca = Ca.make(tmp_path, "ca")
    cert, key = ca.issue(tmp_path, "localhost", usage=ExtendedKeyUsageOID.SERVER_AUTH, server=True)
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("hello\n")
    cases = [
        ({"KMS_TLS_CLIENT_CA_FILE": str(ca.path)}, "needs KMS_TLS_CERT_FILE"),
        (
            {
                "KMS_TLS_CERT_FILE": cert,
                "KMS_TLS_KEY_FILE": key,
                "KMS_TLS_CLIENT_CA_FILE": str(not_pem),
            },
            "no PEM CA certificate",
        ),
        (
            {
                "KMS_TLS_CERT_FILE": cert,
                "KMS_TLS_KEY_FILE": key,
                "KMS_TLS_CLIENT_CA_FILE": str(tmp_path / "missing.pem"),
            },
            "no PEM CA certificate",
        ),
    ]
    for env, message in cases:
        done = run_kms(
            "serve", "--data-dir", str(data), "--bind", f"127.0.0.1:{free_port()}", env=env
        )
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
