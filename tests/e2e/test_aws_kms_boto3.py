"""The AWS KMS face against a live gunicorn server, driven by clients this project did not
write: boto3's ``kms`` client (every operation of the subset and the modeled exceptions)
and the AWS Encryption SDK (a message encrypted and decrypted end to end through this KMS,
with its encryption context bound by the KMS)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import aws_encryption_sdk
import boto3
import pytest
import requests
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
from aws_encryption_sdk.key_providers.kms import StrictAwsKmsMasterKeyProvider
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.helpers import Server

pytestmark = pytest.mark.e2e
REGION = "us-east-1"
ACCOUNT = "000000000000"


def arn(key_id: str) -> str:
    return f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"


class Native:
    """The native admin API (principals, grants, SigV4 credentials, audit)."""

    def __init__(self, server: Server) -> None:
        self.url = server.url
        self.headers = {"Authorization": f"Bearer {server.admin_token}"}

    def call(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        r = requests.request(method, self.url + path, json=body, headers=self.headers, timeout=30)
        assert r.status_code == status, r.text
        return r.json()

    def credential(self, name: str) -> tuple[str, str]:
        made = self.call("POST", f"/v1/principals/{name}/sigv4-credentials", status=201)
        return made["access_key_id"], made["secret_access_key"]

    def grant(self, key_id: str, name: str, *ops: str) -> None:
        ops = ops or ("datakey", "encrypt", "decrypt", "rewrap")
        self.call("POST", f"/v1/keys/{key_id}/grants", {"principal": name, "operations": ops})

    def audit(self, **filters: str) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        return list(self.call("GET", f"/v1/audit?limit=1000&{query}")["records"])


def kms(server: Server, credential: tuple[str, str], region: str = REGION) -> Any:
    """A real boto3 kms client pointed at the server (legacy retry mode: 5 attempts)."""
    return boto3.client(
        "kms",
        endpoint_url=server.url,
        region_name=region,
        aws_access_key_id=credential[0],
        aws_secret_access_key=credential[1],
        config=Config(retries={"mode": "legacy"}),
    )


@pytest.fixture(scope="module")
def native(server: Server) -> Native:
    return Native(server)


@pytest.fixture(scope="module")
def creds(native: Native) -> dict[str, tuple[str, str]]:
    native.call("POST", "/v1/principals", {"name": "app", "role": "service"}, status=201)
    native.call("POST", "/v1/principals", {"name": "aud", "role": "auditor"}, status=201)
    return {name: native.credential(name) for name in ("admin", "app", "aud")}


@pytest.fixture(scope="module")
def admin(server: Server, creds: dict[str, tuple[str, str]]) -> Any:
    return kms(server, creds["admin"])


@pytest.fixture(scope="module")
def app(server: Server, creds: dict[str, tuple[str, str]]) -> Any:
    return kms(server, creds["app"])


def new_key(admin: Any, native: Native, description: str = "key") -> str:
    # A unique description: two equal calls within a second would be one signature (see
    # test_identical_calls_within_a_second_need_a_signed_nonce).
    made = admin.create_key(Description=f"{description} {uuid.uuid4().hex}")
    key_id = str(made["KeyMetadata"]["KeyId"])
    native.grant(key_id, "app")
    return key_id


def refused(call: Any, **kwargs: Any) -> dict[str, Any]:
    """The error a boto3 call raised: a 4xx that botocore did not retry."""
    with pytest.raises(ClientError) as e:
        call(**kwargs)
    response: dict[str, Any] = e.value.response
    assert 400 <= response["ResponseMetadata"]["HTTPStatusCode"] < 500
    assert response["ResponseMetadata"]["RetryAttempts"] == 0
    assert response["ResponseMetadata"]["RequestId"]
    return response


def test_key_management_operations(admin: Any, native: Native, creds: Any, server: Server) -> None:
    meta = admin.create_key(Description="ledger", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
    kid = meta["KeyId"]
    assert meta["Arn"] == arn(kid) and meta["KeyState"] == "Enabled" and meta["Enabled"]
    assert isinstance(meta["CreationDate"], datetime)  # botocore parsed the epoch seconds
    assert admin.describe_key(KeyId=arn(kid))["KeyMetadata"]["Description"] == "ledger"
    others = {admin.create_key(Description=f"other {i}")["KeyMetadata"]["KeyId"] for i in range(3)}
    pages = list(admin.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 2}))
    assert len(pages) >= 2
    listed = [k for page in pages for k in page["Keys"]]
    assert {kid, *others} <= {k["KeyId"] for k in listed}
    assert {"KeyId": kid, "KeyArn": arn(kid)} in listed

    admin.create_alias(AliasName="alias/ledger", TargetKeyId=kid)
    for ref in ("alias/ledger", f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/ledger"):
        assert admin.describe_key(KeyId=ref)["KeyMetadata"]["KeyId"] == kid
    aliases = admin.list_aliases(KeyId=kid)["Aliases"]
    assert [(a["AliasName"], a["TargetKeyId"]) for a in aliases] == [("alias/ledger", kid)]
    with pytest.raises(admin.exceptions.AlreadyExistsException):
        admin.create_alias(AliasName="alias/ledger-2", TargetKeyId=kid)  # one alias per key
    with pytest.raises(admin.exceptions.AlreadyExistsException):
        admin.create_alias(AliasName="alias/ledger", TargetKeyId=sorted(others)[0])
    with pytest.raises(admin.exceptions.InvalidAliasNameException):
        admin.create_alias(AliasName="alias/aws/ledger", TargetKeyId=kid)

    admin.disable_key(KeyId=kid)
    assert admin.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "Disabled"
    admin.enable_key(KeyId=arn(kid))
    deletion = admin.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
    assert deletion["KeyState"] == "PendingDeletion" and deletion["KeyId"] == arn(kid)
    assert deletion["DeletionDate"] > datetime.now(UTC) + timedelta(days=6)
    with pytest.raises(admin.exceptions.KMSInvalidStateException):
        admin.enable_key(KeyId=kid)
    assert admin.cancel_key_deletion(KeyId=kid)["KeyId"] == arn(kid)
    with pytest.raises(admin.exceptions.NotFoundException):
        admin.describe_key(KeyId=str(uuid.uuid4()))
    with pytest.raises(admin.exceptions.NotFoundException):
        admin.disable_key(KeyId="alias/ledger")  # lifecycle operations take no aliases

    auditor = kms(server, creds["aud"])
    assert auditor.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "Disabled"
    assert refused(auditor.create_key)["Error"]["Code"] == "AccessDeniedException"


def test_rotation_operations(admin: Any, app: Any, native: Native) -> None:
    kid = new_key(admin, native)
    assert admin.get_key_rotation_status(KeyId=kid)["KeyRotationEnabled"] is False
    admin.enable_key_rotation(KeyId=kid, RotationPeriodInDays=180)
    status = admin.get_key_rotation_status(KeyId=arn(kid))
    assert status["KeyRotationEnabled"] and status["RotationPeriodInDays"] == 180
    assert status["NextRotationDate"] > datetime.now(UTC) + timedelta(days=179)
    before = app.encrypt(KeyId=kid, Plaintext=b"made under version 1")["CiphertextBlob"]
    assert admin.rotate_key_on_demand(KeyId=kid)["KeyId"] == kid
    rotations = admin.list_key_rotations(KeyId=kid)["Rotations"]
    assert len(rotations) == 1 and rotations[0]["KeyId"] == arn(kid)
    assert isinstance(rotations[0]["RotationDate"], datetime)
    assert app.decrypt(CiphertextBlob=before)["Plaintext"] == b"made under version 1"
    admin.disable_key_rotation(KeyId=kid)
    assert native.call("GET", f"/v1/keys/{kid}")["rotation_period_days"] is None
    with pytest.raises(admin.exceptions.NotFoundException):
        admin.rotate_key_on_demand(KeyId=str(uuid.uuid4()))


def test_crypto_operations_and_modeled_exceptions(admin: Any, app: Any, native: Native) -> None:
    kid, other = new_key(admin, native), new_key(admin, native)
    ctx = {"tenant": "t-1", "table": "patients"}
    sealed = app.encrypt(KeyId=arn(kid), Plaintext=b"record", EncryptionContext=ctx)
    assert sealed["KeyId"] == arn(kid) and sealed["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    blob = sealed["CiphertextBlob"]
    opened = app.decrypt(CiphertextBlob=blob, EncryptionContext=ctx, KeyId=arn(kid))
    assert opened["Plaintext"] == b"record" and opened["KeyId"] == arn(kid)

    data_key = app.generate_data_key(KeyId=kid, KeySpec="AES_256", EncryptionContext=ctx)
    assert len(data_key["Plaintext"]) == 32 and data_key["KeyId"] == arn(kid)
    again = app.decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext=ctx)
    assert again["Plaintext"] == data_key["Plaintext"]
    assert len(app.generate_data_key(KeyId=kid, NumberOfBytes=64)["Plaintext"]) == 64
    hidden = app.generate_data_key_without_plaintext(KeyId=kid, KeySpec="AES_128")
    assert "Plaintext" not in hidden
    assert len(app.decrypt(CiphertextBlob=hidden["CiphertextBlob"])["Plaintext"]) == 16

    moved = app.re_encrypt(
        CiphertextBlob=blob,
        SourceEncryptionContext=ctx,
        DestinationKeyId=other,
        DestinationEncryptionContext={"tenant": "t-1"},
    )
    assert moved["SourceKeyId"] == arn(kid) and moved["KeyId"] == arn(other)
    back = app.decrypt(CiphertextBlob=moved["CiphertextBlob"], EncryptionContext={"tenant": "t-1"})
    assert back["Plaintext"] == b"record" and back["KeyId"] == arn(other)

    exc = app.exceptions
    with pytest.raises(exc.InvalidCiphertextException):
        app.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "t-2", "table": "patients"})
    with pytest.raises(exc.InvalidCiphertextException):
        app.decrypt(CiphertextBlob=blob[:-1] + bytes([blob[-1] ^ 1]), EncryptionContext=ctx)
    with pytest.raises(exc.IncorrectKeyException):
        app.decrypt(CiphertextBlob=blob, EncryptionContext=ctx, KeyId=arn(other))
    # no such key: for a service, the answer of a key it holds no grant on
    denied = refused(app.encrypt, KeyId=str(uuid.uuid4()), Plaintext=b"x")
    assert denied["Error"]["Code"] == "AccessDeniedException"
    with pytest.raises(exc.InvalidKeyUsageException):
        app.encrypt(KeyId=kid, Plaintext=b"x", EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    admin.disable_key(KeyId=kid)
    with pytest.raises(exc.DisabledException):
        app.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)
    with pytest.raises(exc.DisabledException):
        app.generate_data_key(KeyId=kid, NumberOfBytes=32)
    admin.enable_key(KeyId=kid)
    admin.schedule_key_deletion(KeyId=kid, PendingWindowInDays=30)
    with pytest.raises(exc.KMSInvalidStateException):
        app.decrypt(CiphertextBlob=blob, EncryptionContext=ctx, KeyId=kid)
    assert refused(app.create_key)["Error"]["Code"] == "AccessDeniedException"


def _signed(server: Server, cred: tuple[str, str], body: bytes, **kw: Any) -> AWSRequest:
    request = AWSRequest(
        method="POST",
        url=server.url + "/",
        data=body,
        headers={
            "Content-Type": kw.get("content_type", "application/x-amz-json-1.1"),
            "X-Amz-Target": kw.get("target", "TrentService.ListKeys"),
        },
    )
    SigV4Auth(Credentials(*cred), kw.get("service", "kms"), REGION).add_auth(request)
    return request


def _send(request: AWSRequest) -> tuple[int, dict[str, Any]]:
    r = requests.post(request.url, data=request.body, headers=dict(request.headers), timeout=30)
    assert r.headers["Content-Type"] == "application/x-amz-json-1.1"
    assert r.headers["x-amzn-RequestId"]
    return r.status_code, r.json()


def test_authentication_and_bad_requests(
    server: Server, native: Native, creds: dict[str, tuple[str, str]], admin: Any
) -> None:
    kid = new_key(admin, native)
    akid, secret = native.credential("app")
    with_new = kms(server, (akid, secret))
    assert with_new.encrypt(KeyId=kid, Plaintext=b"x")["KeyId"] == arn(kid)
    native.call("DELETE", f"/v1/principals/app/sigv4-credentials/{akid}")
    # The other worker may use its cached credential for KMS_AUTH_CACHE_SECONDS (5 s,
    # without Redis); after that the credential is refused by every worker.
    time.sleep(5.5)
    for _ in range(4):  # whichever worker answers
        revoked = refused(with_new.encrypt, KeyId=kid, Plaintext=b"y")
        assert revoked["Error"]["Code"] == "UnrecognizedClientException"
    unknown = kms(server, ("KMSAAAAAAAAAAAAAAAAAAAAAAAA", secret))
    assert refused(unknown.list_keys)["Error"]["Code"] == "UnrecognizedClientException"
    wrong_secret = kms(server, (creds["admin"][0], "x" * 44))
    assert refused(wrong_secret.list_keys)["Error"]["Code"] == "InvalidSignatureException"
    elsewhere = kms(server, creds["admin"], region="eu-west-3")
    assert refused(elsewhere.list_keys)["Error"]["Code"] == "InvalidSignatureException"
    late = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=10)
    with mock.patch("botocore.auth.get_current_datetime", lambda: late):
        code = refused(admin.list_aliases)["Error"]["Code"]
    assert code == "InvalidSignatureException"

    cred = creds["admin"]
    cases = [
        (_signed(server, cred, b"{}", service="kms-xks-proxy"), "InvalidSignatureException"),
        (_signed(server, cred, b"{not json"), "SerializationException"),
        (
            _signed(server, cred, b"{}", target="TrentService.PutKeyPolicy"),
            "UnknownOperationException",
        ),
        (_signed(server, cred, b'{"Limit": "ten"}'), "ValidationException"),
        (_signed(server, cred, json.dumps({"Limit": 1, "x": 2}).encode()), "ValidationException"),
    ]
    for request, name in cases:
        assert _send(request) == (400, {"__type": name, "message": mock.ANY})
    once = _signed(
        server, cred, json.dumps({"KeyId": kid}).encode(), target="TrentService.EnableKey"
    )
    assert _send(once)[0] == 200
    assert _send(once) == (400, {"__type": "ThrottlingException", "message": mock.ANY})
    unsigned = requests.post(
        server.url + "/",
        data=b"{}",
        headers={"X-Amz-Target": "TrentService.ListKeys"},
        timeout=30,
    )
    assert unsigned.status_code == 400
    assert unsigned.json()["__type"] == "MissingAuthenticationTokenException"
    assert "Traceback" not in server.log_text()


def test_identical_calls_within_a_second(server: Server, creds: dict[str, tuple[str, str]]) -> None:
    """boto3 signs only content-type, host, x-amz-date and x-amz-target, so two equal calls
    in one second carry one signature. The second is refused with ThrottlingException and
    botocore retries it with a new signature: the caller sees both succeed. A copy sent by
    someone else, who cannot sign again, gets nothing."""
    now = datetime.now(UTC).replace(tzinfo=None)
    plain = kms(server, creds["admin"])
    kid = plain.create_key()["KeyMetadata"]["KeyId"]
    with mock.patch("botocore.auth.get_current_datetime", lambda: now):
        plain.describe_key(KeyId=kid)
        # the clock stands still: every retry signs the same bytes again
        assert refused_after_retries(plain.describe_key, KeyId=kid) == "ThrottlingException"
    first = plain.describe_key(KeyId=kid)
    second = plain.describe_key(KeyId=kid)  # same second, most likely: retried if so
    assert first["KeyMetadata"] == second["KeyMetadata"]
    nonced = kms(server, creds["admin"])
    nonced.meta.events.register("before-sign.kms", _add_nonce)
    with mock.patch("botocore.auth.get_current_datetime", lambda: now + timedelta(seconds=9)):
        for _ in range(2):
            nonced.enable_key(KeyId=kid)  # distinct requests: both answered at once


def refused_after_retries(call: Any, **kwargs: Any) -> str:
    with pytest.raises(ClientError) as e:
        call(**kwargs)
    assert e.value.response["ResponseMetadata"]["RetryAttempts"] >= 1  # botocore retried
    return str(e.value.response["Error"]["Code"])


def _add_nonce(request: AWSRequest, **_: Any) -> None:
    request.headers["X-Client-Nonce"] = uuid.uuid4().hex


@pytest.fixture
def esdk_env(server: Server, monkeypatch: pytest.MonkeyPatch, creds: Any) -> Iterator[None]:
    """The AWS Encryption SDK makes its own boto3 clients: point them at the server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["app"][0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["app"][1])
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield


@pytest.mark.parametrize(
    "suite",
    [
        Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,  # the default: signed
        Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
    ],
)
def test_aws_encryption_sdk_round_trip(
    esdk_env: None, admin: Any, native: Native, suite: Algorithm
) -> None:
    kid = new_key(admin, native, "esdk")
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    provider = StrictAwsKmsMasterKeyProvider(key_ids=[arn(kid)])
    message = b"patient 4711: " + bytes(range(256)) * 40
    context = {"tenant": "t-1", "purpose": "invoices-2026"}
    ciphertext, header = client.encrypt(
        source=message, key_provider=provider, encryption_context=context, algorithm=suite
    )
    assert message not in ciphertext
    (edk,) = header.encrypted_data_keys
    assert edk.key_provider.key_info.decode() == arn(kid)
    plaintext, seen = client.decrypt(source=ciphertext, key_provider=provider)
    assert plaintext == message and context.items() <= seen.encryption_context.items()

    # The context travels in the message header; changed there, this KMS refuses the
    # data key (the ESDK has not authenticated the header yet when it asks).
    tampered = ciphertext.replace(b"invoices-2026", b"invoices-2027")
    assert tampered != ciphertext
    with pytest.raises(aws_encryption_sdk.exceptions.AWSEncryptionSDKClientError):
        client.decrypt(source=tampered, key_provider=provider)

    records = native.audit(key_id=kid, principal="app")
    assert [(r["operation"], r["outcome"]) for r in records] == [
        ("datakey", "ok"),
        ("decrypt", "ok"),
        ("decrypt", "decryption_failed"),
    ]
    assert records[0]["context_sha256"] != records[2]["context_sha256"]
    assert records[0]["context_sha256"] == records[1]["context_sha256"]


def test_no_secret_reaches_the_server_log(
    server: Server, app: Any, admin: Any, native: Native
) -> None:
    kid = new_key(admin, native)
    secret = b"do-not-log-" + uuid.uuid4().hex.encode()
    blob = app.encrypt(KeyId=kid, Plaintext=secret)["CiphertextBlob"]
    assert app.decrypt(CiphertextBlob=blob)["Plaintext"] == secret
    log = server.log_text()
    for needle in (secret.decode(), base64.b64encode(secret).decode()):
        assert needle not in log
