"""The 49 conformance checks of AWS's XKS proxy test client (aws-samples/
aws-kms-xksproxy-test-client 1.1.0: 35 by default, 14 more with ``-a``), reproduced check by
check against live gunicorn servers (2 workers), over HTTP and over HTTPS with a self-signed
certificate made here, each request signed either by curl's ``--aws-sigv4`` (as that client
does: multi-line bodies, ``Content-Type`` signed) or by botocore's SigV4 signer.

Like the client, every check looks for an expected string in the response; unlike it, each
also checks the spec's HTTP status and that the JSON body is on one line. Key names and
the URI prefix are the client's defaults (keys ``foo``, ``encrypt_only_key``,
``decrypt_only_key``, ``impotent_key``; prefix ``example/uri/path/prefix``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.helpers import gunicorn_server, init_data_dir, write_pem

pytestmark = pytest.mark.e2e

CURL = "/usr/bin/curl"
URI_PREFIX = "example/uri/path/prefix"  # the test client's default, without the leading '/'
REGION = "us-east-1"
PRINCIPAL_ARN = "arn:aws:iam::123456789012:user/Alice"
KEY_ARN = "arn:aws:kms:us-east-2:123456789012:/key/1234abcd-12ab-34cd-56ef-1234567890ab"
PLAINTEXT = "cGxhaW50ZXh0Cg=="
PLAINTEXT2 = "SGVsbG8gV29ybGQh"
AAD = "cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n"
AAD2 = "cHJvamVjdD1ibHVlLGRlcGFydG1lbnQ9ZmluYW5jZQ=="


# -- servers --------------------------------------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed EC P-256 server certificate for DNS:localhost (key file chmod 600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server-cert.pem", directory / "server-key.pem"
    write_pem(cert, cert_path, key, key_path)
    return cert_path, key_path


@dataclass
class Setup:
    http: str  # http://localhost:<port>
    https: str  # https://localhost:<port>
    cert: Path
    akid: str
    secret: str
    admin: dict[str, str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """One data directory served by two servers (HTTP and HTTPS), with the test client's
    four keys, a service principal granted encrypt and decrypt on them, its SigV4
    credential, and the XKS usage of each key as the client expects."""
    data = init_data_dir(tmp_path_factory.mktemp("xks-data"))
    cert, key = make_certificate(tmp_path_factory.mktemp("tls"))
    env = {"KMS_XKS_URI_PREFIX": "/" + URI_PREFIX, "KMS_LOG_LEVEL": "WARNING"}
    tls = {**env, "KMS_TLS_CERT_FILE": str(cert), "KMS_TLS_KEY_FILE": str(key)}
    with (
        gunicorn_server(data, workers=2, env=env) as plain,
        gunicorn_server(data, env=tls, tls={"verify": str(cert)}) as tls_srv,
    ):
        admin = {"Authorization": f"Bearer {plain.admin_token}"}

        def call(method: str, path: str, body: Any = None) -> Any:
            r = requests.request(method, plain.url + path, json=body, headers=admin, timeout=30)
            assert r.status_code in (200, 201), r.text
            return r.json()

        call("POST", "/v1/principals", {"name": "aws-kms", "role": "service"})
        for alias, usage in (
            ("foo", ["encrypt", "decrypt"]),
            ("encrypt_only_key", ["encrypt"]),
            ("decrypt_only_key", ["decrypt"]),
            ("impotent_key", []),
        ):
            key_id = call("POST", "/v1/keys", {"alias": alias})["key_id"]
            grant = {"principal": "aws-kms", "operations": ["xks_encrypt", "xks_decrypt"]}
            call("POST", f"/v1/keys/{key_id}/grants", grant)
            call("POST", f"/v1/keys/{alias}/xks", {"usage": usage})
        credential = call("POST", "/v1/principals/aws-kms/sigv4-credentials")
        port = plain.url.rsplit(":", 1)[1]
        yield Setup(
            f"http://localhost:{port}",
            tls_srv.url,
            cert,
            credential["access_key_id"],
            credential["secret_access_key"],
            admin,
        )


# -- the two signers ------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    output: str  # what the check searches (curl -i: status line, headers, body)
    body: str  # the last line, as the test client reads it

    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


class Client:
    def __init__(self, setup: Setup, transport: str, signer: str) -> None:
        self.base = setup.https if transport == "https" else setup.http
        self.cert = setup.cert if transport == "https" else None
        self.akid, self.secret = setup.akid, setup.secret
        self.signer = signer
        self.session = requests.Session()

    def post(
        self,
        target: str,
        body: str,
        *,
        akid: str | None = None,
        secret: str | None = None,
        prefix: str = URI_PREFIX,
    ) -> Answer:
        url = f"{self.base}/{prefix}/kms/xks/v1/{target}"
        akid, secret = akid or self.akid, secret or self.secret
        if self.signer == "curl":
            return self._curl(url, body, akid, secret)
        request = AWSRequest(
            "POST", url, data=body.encode(), headers={"Content-Type": "application/json"}
        )
        SigV4Auth(Credentials(akid, secret), "kms-xks-proxy", REGION).add_auth(request)
        r = self.session.post(
            url,
            data=body.encode(),
            headers=dict(request.headers.items()),
            verify=str(self.cert or True),
            timeout=30,
        )
        head = f"HTTP/1.1 {r.status_code}\n" + "".join(f"{k}: {v}\n" for k, v in r.headers.items())
        return Answer(
            r.status_code, head + "\n" + r.text, r.text.splitlines()[-1] if r.text else ""
        )

    def _curl(self, url: str, body: str, akid: str, secret: str) -> Answer:
        command = [CURL, url, "--silent", "-i", "-H", "Content-Type:application/json"]
        command += ["--aws-sigv4", f"aws:amz:{REGION}:kms-xks-proxy", "--user", f"{akid}:{secret}"]
        command += ["--data-binary", body]
        if self.cert is not None:
            command += ["--cacert", str(self.cert)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        status = int(done.stdout.split(" ", 2)[1])
        return Answer(status, done.stdout, done.stdout.splitlines()[-1])


@pytest.fixture(params=["http-curl", "https-curl", "http-botocore", "https-botocore"])
def client(request: pytest.FixtureRequest, setup: Setup) -> Client:
    transport, signer = request.param.split("-")
    return Client(setup, transport, signer)


# -- request bodies, laid out like the test client's (pretty-printed, multi-line) -----------


def request_metadata(operation: str) -> str:
    return (
        '    "requestMetadata": {\n'
        f'        "awsPrincipalArn": "{PRINCIPAL_ARN}",\n'
        f'        "kmsKeyArn": "{KEY_ARN}",\n'
        f'        "kmsOperation": "{operation}",\n'
        f'        "kmsRequestId": "{uuid.uuid4()}",\n'
        '        "kmsViaService": "ebs"\n'
        "    }"
    )


def health_body() -> str:
    return (
        '{\n    "requestMetadata": {\n        "kmsOperation": "KmsHealthCheck",\n'
        f'        "kmsRequestId": "{uuid.uuid4()}"\n    }}\n}}'
    )


EMPTY_METADATA = '{\n    "requestMetadata": {\n    }\n}'


def metadata_body(operation: str) -> str:
    return "{\n" + request_metadata(operation) + "\n}"


def encrypt_body(plaintext: str | None, aad: str = "", cdiv: str | None = None) -> str:
    lines = [
        f'"additionalAuthenticatedData": "{aad}",' if aad else "",
        f'"plaintext": "{plaintext}",' if plaintext is not None else "",
        f'"ciphertextDataIntegrityValueAlgorithm": "{cdiv}",' if cdiv else "",
    ]
    entries = "".join(f"    {line}\n" for line in lines)
    return (
        "{\n"
        + request_metadata("Encrypt")
        + ",\n"
        + entries
        + '    "encryptionAlgorithm": "AES_GCM"\n}'
    )


def decrypt_body(sealed: dict[str, Any], aad: str | None = None) -> str:
    fields = [f'"additionalAuthenticatedData": "{aad}",' if aad is not None else ""]
    for name in ("ciphertext", "initializationVector", "authenticationTag", "ciphertextMetadata"):
        if name in sealed:
            fields.append(f'"{name}": {json.dumps(sealed[name])},')
    entries = "".join(f"    {line}\n" for line in fields)
    return (
        "{\n"
        + request_metadata("Decrypt")
        + ",\n"
        + entries
        + '    "encryptionAlgorithm": "AES_GCM"\n}'
    )


# -- the checks -----------------------------------------------------------------------------


def expect(answer: Answer, substring: str, status: int) -> None:
    """The test client's rule (``substring`` in the output) plus the spec's status and a
    compact one-line JSON body."""
    assert substring in answer.output, answer.output[-2000:]
    assert answer.status == status, answer.output[-2000:]
    assert answer.body.startswith("{") and answer.body.endswith("}")
    json.loads(answer.body)


def encrypted(
    c: Client, key: str, plaintext: str, aad: str = "", cdiv: str | None = None
) -> dict[str, Any]:
    answer = c.post(f"keys/{key}/encrypt", encrypt_body(plaintext, aad, cdiv))
    expect(answer, '"ciphertext":', 200)
    return answer.json()


def verify_cdiv(sealed: dict[str, Any], aad: str) -> None:
    """The client recomputes SHA-256(AAD || metadata || IV || ciphertext || tag)."""
    raw = base64.b64decode(aad) + b"".join(
        base64.b64decode(sealed.get(f, ""))
        for f in ("ciphertextMetadata", "initializationVector", "ciphertext", "authenticationTag")
    )
    assert base64.b64decode(sealed["ciphertextDataIntegrityValue"]) == hashlib.sha256(raw).digest()


def _health(c: Client) -> Answer:
    return c.post("health", health_body())


def _bad_akid(c: Client, target: str, body: str) -> None:
    expect(c.post(target, body, akid="Invalid" + c.akid), "AuthenticationFailedException", 401)


def _bad_secret(c: Client, target: str, body: str) -> None:
    expect(c.post(target, body, secret="Invalid" + c.secret), "AuthenticationFailedException", 401)


def _bad_prefix(c: Client, target: str, body: str) -> None:
    answer = c.post(target, body, prefix=URI_PREFIX + "/invalid")
    expect(answer, "InvalidUriPathException", 404)


def _encrypt_then_decrypt(
    c: Client,
    key: str,
    plaintext: str,
    enc_aad: str,
    dec_aad: str | None,
    want: str,
    status: int,
    cdiv: str | None = None,
) -> None:
    sealed = encrypted(c, key, plaintext, enc_aad, cdiv)
    answer = c.post(f"keys/{key}/decrypt", decrypt_body(sealed, dec_aad))
    expect(answer, want, status)
    if status == 200:
        assert answer.json()["plaintext"] == plaintext


def _encrypt_with_cdiv(c: Client, aad: str) -> dict[str, Any]:
    answer = c.post("keys/foo/encrypt", encrypt_body(PLAINTEXT2, aad, "SHA_256"))
    expect(answer, '"ciphertextDataIntegrityValue":', 200)
    sealed = answer.json()
    verify_cdiv(sealed, aad)
    return sealed


LARGE_PLAINTEXT = base64.b64encode(os.urandom(4096)).decode()
LARGE_AAD = base64.b64encode(os.urandom(8192)).decode()


def _key_usage_refused(key: str, aad: str, cdiv: str | None) -> Callable[[Client], None]:
    def check(c: Client) -> None:
        answer = c.post(f"keys/{key}/encrypt", encrypt_body(PLAINTEXT, aad, cdiv))
        expect(answer, "InvalidKeyUsageException", 400)

    return check


CHECKS: dict[str, Callable[[Client], None]] = {
    # test_get_health_status (6)
    "health": lambda c: expect(_health(c), '"healthStatus":', 200),
    "health-without-request-metadata": lambda c: expect(
        c.post("health", "{}"), "ValidationException", 400
    ),
    "health-empty-request-metadata": lambda c: expect(
        c.post("health", EMPTY_METADATA), "ValidationException", 400
    ),
    "health-invalid-access-key-id": lambda c: _bad_akid(c, "health", health_body()),
    "health-invalid-secret": lambda c: _bad_secret(c, "health", health_body()),
    "health-invalid-uri-prefix": lambda c: _bad_prefix(c, "health", health_body()),
    # test_get_key_metadata (8)
    "metadata-describe-key": lambda c: expect(
        c.post("keys/foo/metadata", metadata_body("DescribeKey")), '"keyStatus":', 200
    ),
    "metadata-create-key": lambda c: expect(
        c.post("keys/foo/metadata", metadata_body("CreateKey")), '"keyStatus":', 200
    ),
    "metadata-without-request-metadata": lambda c: expect(
        c.post("keys/foo/metadata", "{}"), "ValidationException", 400
    ),
    "metadata-empty-request-metadata": lambda c: expect(
        c.post("keys/foo/metadata", EMPTY_METADATA), "ValidationException", 400
    ),
    "metadata-non-existent-key": lambda c: expect(
        c.post("keys/non_existing_key/metadata", metadata_body("DescribeKey")),
        "KeyNotFoundException",
        404,
    ),
    "metadata-invalid-access-key-id": lambda c: _bad_akid(
        c, "keys/foo/metadata", metadata_body("DescribeKey")
    ),
    "metadata-invalid-secret": lambda c: _bad_secret(
        c, "keys/foo/metadata", metadata_body("DescribeKey")
    ),
    "metadata-invalid-uri-prefix": lambda c: _bad_prefix(
        c, "keys/foo/metadata", metadata_body("DescribeKey")
    ),
    # test_encrypt_decrypt (21)
    "encrypt-non-existing-key": lambda c: expect(
        c.post("keys/non_existing_key/encrypt", encrypt_body(PLAINTEXT)),
        "KeyNotFoundException",
        404,
    ),
    "encrypt-missing-plaintext": lambda c: expect(
        c.post("keys/foo/encrypt", encrypt_body(None)), "ValidationException", 400
    ),
    "encrypt-invalid-access-key-id": lambda c: _bad_akid(
        c, "keys/foo/encrypt", encrypt_body(PLAINTEXT)
    ),
    "encrypt-invalid-secret": lambda c: _bad_secret(c, "keys/foo/encrypt", encrypt_body(PLAINTEXT)),
    "encrypt-invalid-uri-path": lambda c: _bad_prefix(
        c, "keys/foo/encrypt", encrypt_body(PLAINTEXT)
    ),
    "encrypt-with-aad-1": lambda c: encrypted(c, "foo", PLAINTEXT, AAD) and None,
    "decrypt-missing-aad-1": lambda c: _encrypt_then_decrypt(
        c, "foo", PLAINTEXT, AAD, None, "InvalidCiphertextException", 400
    ),
    "encrypt-with-aad-2": lambda c: encrypted(c, "foo", PLAINTEXT, AAD) and None,
    "decrypt-missing-aad-2": lambda c: _encrypt_then_decrypt(
        c, "foo", PLAINTEXT, AAD, None, "InvalidCiphertextException", 400
    ),
    "encrypt-with-aad-3": lambda c: encrypted(c, "foo", PLAINTEXT, AAD) and None,
    "decrypt-different-aad": lambda c: _encrypt_then_decrypt(
        c, "foo", PLAINTEXT, AAD, AAD2, "InvalidCiphertextException", 400
    ),
    "encrypt-without-aad": lambda c: encrypted(c, "foo", PLAINTEXT2) and None,
    "decrypt-without-aad": lambda c: _encrypt_then_decrypt(
        c, "foo", PLAINTEXT2, "", None, '"plaintext":', 200
    ),
    "encrypt-with-aad-4": lambda c: encrypted(c, "foo", PLAINTEXT2, AAD) and None,
    "decrypt-same-aad": lambda c: _encrypt_then_decrypt(
        c, "foo", PLAINTEXT2, AAD, AAD, '"plaintext":', 200
    ),
    "encrypt-aad-cdiv": lambda c: _encrypt_with_cdiv(c, AAD) and None,
    "decrypt-after-aad-cdiv": lambda c: expect(
        c.post("keys/foo/decrypt", decrypt_body(_encrypt_with_cdiv(c, AAD), AAD)),
        '"plaintext":',
        200,
    ),
    "encrypt-cdiv-without-aad": lambda c: _encrypt_with_cdiv(c, "") and None,
    "decrypt-after-cdiv-without-aad": lambda c: expect(
        c.post("keys/foo/decrypt", decrypt_body(_encrypt_with_cdiv(c, ""))), '"plaintext":', 200
    ),
    "encrypt-large-plaintext-large-aad": lambda c: (
        encrypted(c, "foo", LARGE_PLAINTEXT, LARGE_AAD) and None
    ),
    "decrypt-large-ciphertext-large-aad": lambda c: _encrypt_then_decrypt(
        c, "foo", LARGE_PLAINTEXT, LARGE_AAD, LARGE_AAD, '"plaintext":', 200
    ),
    # test_encrypt_only_key (6, with -a)
    "encrypt-only-key-encrypt": lambda c: encrypted(c, "encrypt_only_key", PLAINTEXT) and None,
    "encrypt-only-key-decrypt": lambda c: _encrypt_then_decrypt(
        c, "encrypt_only_key", PLAINTEXT, "", None, "InvalidKeyUsageException", 400
    ),
    "encrypt-only-key-encrypt-aad": lambda c: (
        encrypted(c, "encrypt_only_key", PLAINTEXT, AAD) and None
    ),
    "encrypt-only-key-decrypt-aad": lambda c: _encrypt_then_decrypt(
        c, "encrypt_only_key", PLAINTEXT, AAD, AAD, "InvalidKeyUsageException", 400
    ),
    "encrypt-only-key-cdiv-aad": _key_usage_refused("encrypt_only_key", AAD, "SHA_256"),
    "encrypt-only-key-cdiv": _key_usage_refused("encrypt_only_key", "", "SHA_256"),
    # test_decrypt_only_key and test_impotent_key (4 + 4, with -a)
    **{
        f"{key.replace('_', '-')}-{label}": _key_usage_refused(key, aad, cdiv)
        for key in ("decrypt_only_key", "impotent_key")
        for label, aad, cdiv in (
            ("encrypt-aad", AAD, None),
            ("encrypt", "", None),
            ("encrypt-aad-cdiv", AAD, "SHA_256"),
            ("encrypt-cdiv", "", "SHA_256"),
        )
    },
}


def test_the_client_has_49_checks() -> None:
    assert len(CHECKS) == 49


@pytest.mark.parametrize("check", list(CHECKS))
def test_conformance(client: Client, check: str) -> None:
    CHECKS[check](client)


# -- beyond the client ----------------------------------------------------------------------


def test_curl_signs_content_type_over_a_multi_line_body(setup: Setup) -> None:
    body = metadata_body("CreateKey")
    assert body.count("\n") >= 8
    url = f"{setup.https}/{URI_PREFIX}/kms/xks/v1/keys/foo/metadata"
    tls = ["--cacert", str(setup.cert)]
    sigv4 = [
        "--aws-sigv4",
        f"aws:amz:{REGION}:kms-xks-proxy",
        "--user",
        f"{setup.akid}:{setup.secret}",
    ]
    done = subprocess.run(
        [
            CURL,
            url,
            "-sv",
            *tls,
            "-H",
            "Content-Type:application/json",
            *sigv4,
            "--data-binary",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "SignedHeaders=content-type;host;x-amz-date" in done.stderr
    assert json.loads(done.stdout) == {
        "keySpec": "AES_256",
        "keyUsage": ["ENCRYPT", "DECRYPT"],
        "keyStatus": "ENABLED",
    }


def test_tls_is_1_2_or_later_with_a_spec_cipher_suite(setup: Setup) -> None:
    port = int(setup.https.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(setup.cert))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.cipher()[0] in {
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
        }
    tls12 = ssl.create_default_context(cafile=str(setup.cert))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    tls12.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")  # the spec's TLS 1.2 suite
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        tls12.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.2"
        assert tls.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    with pytest.raises(requests.exceptions.SSLError):  # the certificate is not trusted by default
        requests.get(setup.https + "/healthz", timeout=10)


def test_audit_records_of_the_checks_carry_kms_request_ids(setup: Setup) -> None:
    c = Client(setup, "https", "curl")
    body = metadata_body("CreateKey")
    request_id = body.split('"kmsRequestId": "')[1].split('"')[0]
    expect(c.post("keys/foo/metadata", body), '"keyStatus":', 200)
    records = requests.get(
        setup.http + "/v1/audit?operation=xks_metadata&limit=1000", headers=setup.admin, timeout=30
    ).json()["records"]
    (mine,) = [r for r in records if f"rid={request_id} " in (r["detail"] or "")]
    assert mine["outcome"] == "ok" and mine["principal"] == "aws-kms"
    assert mine["detail"].startswith(f"xks rid={request_id} op=CreateKey principal={PRINCIPAL_ARN}")
