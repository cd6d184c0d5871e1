"""The AWS KMS JSON API face through the Flask test client, every request signed by
botocore's own SigV4 signer (a client this project did not write): operations, ARNs,
encryption context, AWS error names and statuses, audit records, and bad input."""

from __future__ import annotations

import base64
import json
import sqlite3
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms import config
from kms.api.aws_kms import OPERATIONS
from kms.app import create_app
from kms.services.rate_limits import parse_rate_limits
from tests.helpers import Api

CT = "application/x-amz-json-1.1"
ACCOUNT = "000000000000"


def arn(key_id: str) -> str:
    return f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{key_id}"


class Aws:
    """One principal's SigV4 credential, signing each request afresh with botocore."""

    def __init__(self, client: Any, akid: str, secret: str) -> None:
        self.client = client
        self.akid = akid
        self.secret = secret

    def raw(
        self,
        target: str,
        data: bytes,
        *,
        service: str = "kms",
        region: str = "us-east-1",
        secret: str | None = None,
        content_type: str = CT,
        when: datetime | None = None,
        sign: bool = True,
    ) -> Any:
        # A signed nonce header keeps these test calls distinct, so that no state-changing
        # call is ever a replay of an earlier one (see test_replays below).
        request = AWSRequest(
            method="POST",
            url="http://localhost/",
            data=data,
            headers={
                "Content-Type": content_type,
                "X-Amz-Target": target,
                "X-Client-Nonce": uuid.uuid4().hex,
            },
        )
        if sign:
            signer = SigV4Auth(Credentials(self.akid, secret or self.secret), service, region)
            if when is None:
                signer.add_auth(request)
            else:
                with mock.patch("botocore.auth.get_current_datetime", lambda: when):
                    signer.add_auth(request)
        return self.client.post("/", data=data, headers=dict(request.headers.items()))

    def call(self, op: str, **body: Any) -> Any:
        return self.raw(f"TrentService.{op}", json.dumps(body).encode())

    def ok(self, op: str, **body: Any) -> dict[str, Any]:
        r = self.call(op, **body)
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.headers["Content-Type"] == CT
        return dict(json.loads(r.get_data()))

    def error(self, op: str, **body: Any) -> str:
        """The AWS error name of a refused call (always 400)."""
        return error_of(self.call(op, **body))


def error_of(r: Any, status: int = 400) -> str:
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.headers["Content-Type"] == CT
    body = json.loads(r.get_data())
    assert set(body) == {"__type", "message"} and body["message"]
    assert "Traceback" not in body["message"]
    return str(body["__type"])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def credential(api: Api, name: str) -> tuple[str, str]:
    r = api.call("POST", f"/v1/principals/{name}/sigv4-credentials", api.admin)
    assert r.status_code == 201, r.json
    return r.json["access_key_id"], r.json["secret_access_key"]


@pytest.fixture
def admin(app: Any, api: Api) -> Aws:
    return Aws(app.test_client(), *credential(api, "admin"))


@pytest.fixture
def svc_headers(api: Api) -> dict[str, str]:
    return api.principal("service", "app")


@pytest.fixture
def svc(app: Any, api: Api, svc_headers: dict[str, str]) -> Aws:
    return Aws(app.test_client(), *credential(api, "app"))


def key(api: Api, grantee: dict[str, str] | None = None, ops: tuple[str, ...] = ()) -> str:
    return api.key(grant=grantee, ops=ops or ("datakey", "encrypt", "decrypt", "rewrap"))


def records_of(api: Api, request_id: str) -> list[dict[str, Any]]:
    return [r for r in api.audit() if r["request_id"] == request_id]


# -- crypto ------------------------------------------------------------------------------


def test_encrypt_decrypt_round_trip_binds_the_context(api: Api, svc: Aws, svc_headers: Any) -> None:
    kid = key(api, svc_headers)
    ctx = {"purpose": "invoice", "tenant": "t-1"}
    sealed = svc.ok("Encrypt", KeyId=arn(kid), Plaintext=b64(b"secret"), EncryptionContext=ctx)
    assert sealed["KeyId"] == arn(kid) and sealed["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    r = svc.call("Decrypt", CiphertextBlob=sealed["CiphertextBlob"], EncryptionContext=ctx)
    opened = json.loads(r.get_data())
    assert r.status_code == 200 and base64.b64decode(opened["Plaintext"]) == b"secret"
    assert opened["KeyId"] == arn(kid)
    # one audit record, the native operation's, under the request id AWS SDKs report
    (record,) = records_of(api, r.headers["x-amzn-RequestId"])
    assert record["operation"] == "decrypt" and record["principal"] == "app"
    assert record["key_id"] == kid and record["outcome"] == "ok"
    for wrong in ({}, {"purpose": "invoice"}, {**ctx, "tenant": "t-2"}, {**ctx, "x": ""}):
        bad = svc.call("Decrypt", CiphertextBlob=sealed["CiphertextBlob"], EncryptionContext=wrong)
        assert error_of(bad) == "InvalidCiphertextException"
        (refused,) = records_of(api, bad.headers["x-amzn-RequestId"])
        assert refused["operation"] == "decrypt" and refused["outcome"] == "decryption_failed"


def test_corrupt_or_foreign_ciphertexts_are_invalid_ciphertext(
    api: Api, svc: Aws, svc_headers: Any
) -> None:
    kid, other = key(api, svc_headers), key(api, svc_headers)
    blob = base64.b64decode(
        svc.ok("Encrypt", KeyId=kid, Plaintext=b64(b"x" * 40))["CiphertextBlob"]
    )
    moved = blob.replace(kid.encode(), other.encode())  # names a key the caller may use
    assert svc.ok("Decrypt", CiphertextBlob=b64(blob))["KeyId"] == arn(kid)
    flipped_last = blob[:-1] + bytes([blob[-1] ^ 1])
    flipped_mid = blob[:60] + bytes([blob[60] ^ 0x80]) + blob[61:]
    bad_length = blob[:5] + bytes([200]) + blob[6:]
    other_version = blob[:42] + bytes([blob[42] + 1]) + blob[43:]
    for bad in (flipped_last, flipped_mid, blob[:-1], blob[:30], bad_length, other_version, moved):
        assert svc.error("Decrypt", CiphertextBlob=b64(bad)) == "InvalidCiphertextException"
    for foreign in (b"not a blob of ours", uuid.uuid4().bytes * 10):
        assert svc.error("Decrypt", CiphertextBlob=b64(foreign)) == "InvalidCiphertextException"
    assert svc.error("Decrypt", CiphertextBlob=b64(b"k" * 6145)) == "ValidationException"
    assert svc.error("Decrypt", CiphertextBlob="") == "ValidationException"
    assert svc.error("Decrypt", CiphertextBlob="***") == "ValidationException"


def test_decrypt_with_another_key_is_incorrect_key(api: Api, svc: Aws, svc_headers: Any) -> None:
    kid, other = key(api, svc_headers), key(api, svc_headers)
    blob = svc.ok("Encrypt", KeyId=kid, Plaintext=b64(b"p"))["CiphertextBlob"]
    for named in (kid, arn(kid)):
        assert svc.ok("Decrypt", CiphertextBlob=blob, KeyId=named)["KeyId"] == arn(kid)
    for named in (other, arn(other)):
        r = svc.call("Decrypt", CiphertextBlob=blob, KeyId=named)
        assert error_of(r) == "IncorrectKeyException"
        (record,) = records_of(api, r.headers["x-amzn-RequestId"])
        assert record["operation"] == "decrypt" and record["outcome"] == "incorrect_key"
    missing = str(uuid.uuid4())
    assert svc.error("Decrypt", CiphertextBlob=blob, KeyId=missing) == "IncorrectKeyException"
    assert svc.error("Decrypt", CiphertextBlob=blob, KeyId="nope") == "NotFoundException"


def test_generate_data_key_sizes_and_without_plaintext(
    api: Api, svc: Aws, svc_headers: Any
) -> None:
    kid = key(api, svc_headers)
    for spec, size in (
        ({"NumberOfBytes": 1}, 1),
        ({"NumberOfBytes": 1024}, 1024),
        (
            {"KeySpec": "AES_128"},
            16,
        ),
        ({"KeySpec": "AES_256"}, 32),
    ):
        made = svc.ok("GenerateDataKey", KeyId=kid, EncryptionContext={"a": "b"}, **spec)
        plaintext = base64.b64decode(made["Plaintext"])
        assert len(plaintext) == size and made["KeyId"] == arn(kid)
        opened = svc.ok(
            "Decrypt", CiphertextBlob=made["CiphertextBlob"], EncryptionContext={"a": "b"}
        )
        assert base64.b64decode(opened["Plaintext"]) == plaintext
    hidden = svc.ok("GenerateDataKeyWithoutPlaintext", KeyId=kid, KeySpec="AES_256")
    assert "Plaintext" not in hidden and hidden["KeyId"] == arn(kid)
    assert (
        len(
            base64.b64decode(
                svc.ok("Decrypt", CiphertextBlob=hidden["CiphertextBlob"])["Plaintext"]
            )
        )
        == 32
    )
    for bad in (
        {},
        {"NumberOfBytes": 0},
        {"NumberOfBytes": 1025},
        {"NumberOfBytes": 32, "KeySpec": "AES_256"},
        {"KeySpec": "AES_512"},
        {"NumberOfBytes": "32"},
    ):
        assert svc.error("GenerateDataKey", KeyId=kid, **bad) == "ValidationException", bad


def test_reencrypt_to_another_key_and_context(api: Api, svc: Aws, svc_headers: Any) -> None:
    src, dst = key(api, svc_headers), key(api, svc_headers)
    blob = svc.ok("Encrypt", KeyId=src, Plaintext=b64(b"moved"), EncryptionContext={"v": "1"})
    moved = svc.ok(
        "ReEncrypt",
        CiphertextBlob=blob["CiphertextBlob"],
        SourceEncryptionContext={"v": "1"},
        SourceKeyId=arn(src),
        DestinationKeyId=arn(dst),
        DestinationEncryptionContext={"v": "2"},
    )
    assert moved["SourceKeyId"] == arn(src) and moved["KeyId"] == arn(dst)
    opened = svc.ok("Decrypt", CiphertextBlob=moved["CiphertextBlob"], EncryptionContext={"v": "2"})
    assert base64.b64decode(opened["Plaintext"]) == b"moved" and opened["KeyId"] == arn(dst)
    assert (
        svc.error("Decrypt", CiphertextBlob=moved["CiphertextBlob"], EncryptionContext={"v": "1"})
        == "InvalidCiphertextException"
    )
    # no DestinationEncryptionContext: none, as on AWS
    bare = svc.ok(
        "ReEncrypt",
        CiphertextBlob=blob["CiphertextBlob"],
        SourceEncryptionContext={"v": "1"},
        DestinationKeyId=src,
    )
    assert svc.ok("Decrypt", CiphertextBlob=bare["CiphertextBlob"])["KeyId"] == arn(src)
    wrong_source = svc.call(
        "ReEncrypt",
        CiphertextBlob=blob["CiphertextBlob"],
        SourceEncryptionContext={"v": "1"},
        SourceKeyId=dst,
        DestinationKeyId=dst,
    )
    assert error_of(wrong_source) == "IncorrectKeyException"


def test_changing_the_context_needs_the_decrypt_grant(api: Api, svc: Aws, svc_headers: Any) -> None:
    kid = key(api, svc_headers, ops=("encrypt", "rewrap"))
    blob = svc.ok("Encrypt", KeyId=kid, Plaintext=b64(b"p"), EncryptionContext={"v": "1"})
    same = {"CiphertextBlob": blob["CiphertextBlob"], "SourceEncryptionContext": {"v": "1"}}
    assert svc.ok(
        "ReEncrypt", **same, DestinationKeyId=kid, DestinationEncryptionContext={"v": "1"}
    )
    r = svc.call("ReEncrypt", **same, DestinationKeyId=kid, DestinationEncryptionContext={"v": "2"})
    assert error_of(r) == "AccessDeniedException"


def test_key_states_answer_aws_exceptions(api: Api, admin: Aws, svc: Aws, svc_headers: Any) -> None:
    kid = key(api, svc_headers)
    blob = svc.ok("Encrypt", KeyId=kid, Plaintext=b64(b"p"))["CiphertextBlob"]
    admin.ok("DisableKey", KeyId=kid)
    assert admin.ok("DescribeKey", KeyId=kid)["KeyMetadata"]["KeyState"] == "Disabled"
    assert svc.error("Encrypt", KeyId=kid, Plaintext=b64(b"p")) == "DisabledException"
    assert svc.error("Decrypt", CiphertextBlob=blob) == "DisabledException"
    assert svc.error("GenerateDataKey", KeyId=kid, NumberOfBytes=32) == "DisabledException"
    assert admin.error("RotateKeyOnDemand", KeyId=kid) == "DisabledException"
    admin.ok("EnableKey", KeyId=kid)
    scheduled = admin.ok("ScheduleKeyDeletion", KeyId=arn(kid), PendingWindowInDays=7)
    assert scheduled["KeyState"] == "PendingDeletion" and scheduled["PendingWindowInDays"] == 7
    assert (
        scheduled["KeyId"] == arn(kid) and scheduled["DeletionDate"] > datetime.now(UTC).timestamp()
    )
    assert svc.error("Decrypt", CiphertextBlob=blob) == "KMSInvalidStateException"
    assert svc.error("Encrypt", KeyId=kid, Plaintext=b64(b"p")) == "KMSInvalidStateException"
    assert admin.error("EnableKey", KeyId=kid) == "KMSInvalidStateException"
    assert admin.ok("CancelKeyDeletion", KeyId=kid) == {"KeyId": arn(kid)}
    assert admin.ok("DescribeKey", KeyId=kid)["KeyMetadata"]["KeyState"] == "Disabled"
    assert admin.error("CancelKeyDeletion", KeyId=kid) == "KMSInvalidStateException"


def test_a_retired_version_is_invalid_state(
    api: Api, admin: Aws, svc: Aws, svc_headers: Any
) -> None:
    kid = key(api, svc_headers)
    old = svc.ok("Encrypt", KeyId=kid, Plaintext=b64(b"p"))["CiphertextBlob"]
    admin.ok("RotateKeyOnDemand", KeyId=kid)
    assert svc.ok("Decrypt", CiphertextBlob=old)["KeyId"] == arn(kid)
    r = api.call("POST", f"/v1/keys/{kid}/config", api.admin, json={"min_decryption_version": 2})
    assert r.status_code == 200
    refused = svc.call("Decrypt", CiphertextBlob=old)
    assert error_of(refused) == "KMSInvalidStateException"
    assert "retired" in json.loads(refused.get_data())["message"]


# -- keys, aliases, rotation -----------------------------------------------------------------


def test_create_describe_list_keys(api: Api, admin: Aws) -> None:
    made = admin.ok("CreateKey", Description="invoices", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
    kid = made["KeyId"]
    assert made["Arn"] == arn(kid) and made["AWSAccountId"] == ACCOUNT
    assert made["KeyState"] == "Enabled" and made["Enabled"] is True
    assert made["Description"] == "invoices" and made["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert abs(made["CreationDate"] - datetime.now(UTC).timestamp()) < 60
    assert api.call("GET", f"/v1/keys/{kid}", api.admin).json["description"] == "invoices"
    for ref in (kid, arn(kid)):
        assert admin.ok("DescribeKey", KeyId=ref)["KeyMetadata"]["Arn"] == arn(kid)
    others = [admin.ok("CreateKey")["KeyMetadata"]["KeyId"] for _ in range(2)]
    listed = admin.ok("ListKeys")
    assert {k["KeyId"] for k in listed["Keys"]} == {kid, *others} and not listed["Truncated"]
    assert {"KeyId": kid, "KeyArn": arn(kid)} in listed["Keys"]
    first = admin.ok("ListKeys", Limit=2)
    assert len(first["Keys"]) == 2 and first["Truncated"]
    rest = admin.ok("ListKeys", Limit=2, Marker=first["NextMarker"])
    assert len(rest["Keys"]) == 1 and not rest["Truncated"]
    assert admin.error("ListKeys", Marker="bogus") == "InvalidMarkerException"
    assert admin.error("ListKeys", Limit=0) == "ValidationException"


def test_aliases(api: Api, admin: Aws, svc: Aws, svc_headers: Any) -> None:
    kid, other = key(api, svc_headers), key(api)
    assert admin.ok("CreateAlias", AliasName="alias/billing", TargetKeyId=arn(kid)) == {}
    alias_arn = f"arn:aws:kms:us-east-1:{ACCOUNT}:alias/billing"
    for ref in ("alias/billing", alias_arn):
        assert admin.ok("DescribeKey", KeyId=ref)["KeyMetadata"]["KeyId"] == kid
        assert svc.ok("Encrypt", KeyId=ref, Plaintext=b64(b"p"))["KeyId"] == arn(kid)
    blob = svc.ok("Encrypt", KeyId=kid, Plaintext=b64(b"p"))["CiphertextBlob"]
    assert svc.ok("Decrypt", CiphertextBlob=blob, KeyId="alias/billing")["KeyId"] == arn(kid)
    assert admin.ok("CreateAlias", AliasName="alias/archive", TargetKeyId=other) == {}
    wrong = svc.call("Decrypt", CiphertextBlob=blob, KeyId="alias/archive")
    assert error_of(wrong) == "IncorrectKeyException"
    listed = admin.ok("ListAliases")["Aliases"]
    assert {"AliasName": "alias/billing", "AliasArn": alias_arn, "TargetKeyId": kid} in listed
    assert [a["AliasName"] for a in admin.ok("ListAliases", KeyId=other)["Aliases"]] == [
        "alias/archive"
    ]
    # one alias per key, one key per alias
    r = admin.call("CreateAlias", AliasName="alias/second", TargetKeyId=kid)
    assert error_of(r) == "AlreadyExistsException"
    assert "one alias per key" in json.loads(r.get_data())["message"]
    third = key(api)
    assert admin.error("CreateAlias", AliasName="alias/billing", TargetKeyId=third) == (
        "AlreadyExistsException"
    )
    for bad in ("billing", "alias/", "alias/aws/x", "alias/a b", "alias/" + "x" * 65):
        assert admin.error("CreateAlias", AliasName=bad, TargetKeyId=third) == (
            "InvalidAliasNameException"
        ), bad
    assert admin.error("CreateAlias", AliasName="alias/z", TargetKeyId="alias/billing") == (
        "NotFoundException"
    )
    assert admin.error("CreateAlias", AliasName="alias/z", TargetKeyId=str(uuid.uuid4())) == (
        "NotFoundException"
    )
    assert (
        svc.error("CreateAlias", AliasName="alias/z", TargetKeyId=third) == "AccessDeniedException"
    )
    assert admin.error("DescribeKey", KeyId="alias/none") == "NotFoundException"
    # lifecycle and rotation operations take key ids and key ARNs only
    for op in ("DisableKey", "EnableKeyRotation", "RotateKeyOnDemand", "ScheduleKeyDeletion"):
        assert admin.error(op, KeyId="alias/billing") == "NotFoundException"
    audited = [r for r in api.audit() if r["operation"] == "create_alias"]
    assert [r["outcome"] for r in audited[:2]] == ["ok", "ok"] and audited[0]["key_id"] == kid


def test_rotation_operations(api: Api, admin: Aws, svc: Aws, svc_headers: Any) -> None:
    kid = key(api, svc_headers)
    status = admin.ok("GetKeyRotationStatus", KeyId=kid)
    assert status == {"KeyId": arn(kid), "KeyRotationEnabled": False}
    assert admin.ok("EnableKeyRotation", KeyId=arn(kid)) == {}
    status = admin.ok("GetKeyRotationStatus", KeyId=kid)
    assert status["KeyRotationEnabled"] and status["RotationPeriodInDays"] == 365
    expected = datetime.now(UTC) + timedelta(days=365)
    assert abs(status["NextRotationDate"] - expected.timestamp()) < 60
    admin.ok("EnableKeyRotation", KeyId=kid, RotationPeriodInDays=90)
    assert admin.ok("GetKeyRotationStatus", KeyId=kid)["RotationPeriodInDays"] == 90
    for days in (89, 2561):
        assert admin.error("EnableKeyRotation", KeyId=kid, RotationPeriodInDays=days) == (
            "ValidationException"
        )
    old = svc.ok("Encrypt", KeyId=kid, Plaintext=b64(b"before"))["CiphertextBlob"]
    assert admin.ok("ListKeyRotations", KeyId=kid)["Rotations"] == []
    assert admin.ok("RotateKeyOnDemand", KeyId=kid) == {"KeyId": kid}
    admin.ok("RotateKeyOnDemand", KeyId=arn(kid))
    rotations = admin.ok("ListKeyRotations", KeyId=kid)["Rotations"]
    assert len(rotations) == 2 and all(r["KeyId"] == arn(kid) for r in rotations)
    every = admin.ok("ListKeyRotations", KeyId=kid, IncludeKeyMaterial="ALL_KEY_MATERIAL")
    assert len(every["Rotations"]) == 3
    assert api.call("GET", f"/v1/keys/{kid}", api.admin).json["current_version"] == 3
    assert base64.b64decode(svc.ok("Decrypt", CiphertextBlob=old)["Plaintext"]) == b"before"
    admin.ok("DisableKeyRotation", KeyId=kid)
    assert admin.ok("GetKeyRotationStatus", KeyId=kid)["KeyRotationEnabled"] is False
    assert api.call("GET", f"/v1/keys/{kid}", api.admin).json["rotation_period_days"] is None


def test_roles(api: Api, app: Any, admin: Aws, svc: Aws, svc_headers: Any) -> None:
    kid, foreign = key(api, svc_headers), key(api)
    api.principal("auditor", "aud")
    auditor = Aws(app.test_client(), *credential(api, "aud"))
    assert svc.error("CreateKey") == "AccessDeniedException"
    assert svc.error("DisableKey", KeyId=kid) == "AccessDeniedException"
    assert svc.error("ListKeys") == "AccessDeniedException"
    assert admin.error("Encrypt", KeyId=kid, Plaintext=b64(b"p")) == "AccessDeniedException"
    assert svc.error("Encrypt", KeyId=foreign, Plaintext=b64(b"p")) == "AccessDeniedException"
    assert auditor.ok("ListKeys")["Keys"] and auditor.ok("DescribeKey", KeyId=kid)
    assert auditor.error("CreateKey") == "AccessDeniedException"
    assert svc.ok("DescribeKey", KeyId=kid)["KeyMetadata"]["KeyId"] == kid  # it holds a grant
    r = svc.call("DescribeKey", KeyId=foreign)
    assert error_of(r) == "AccessDeniedException"
    (record,) = records_of(api, r.headers["x-amzn-RequestId"])
    assert record["operation"] == "describe_key" and record["outcome"] == "forbidden"


# -- bad input, authentication, faults ---------------------------------------------------------


def test_authentication_failures_are_aws_errors_and_not_audited(
    api: Api, app: Any, svc: Aws, svc_headers: Any
) -> None:
    kid = key(api, svc_headers)
    body = json.dumps({"KeyId": kid, "NumberOfBytes": 32}).encode()
    target = "TrentService.GenerateDataKey"
    before = len(api.audit())
    now = datetime.now(UTC).replace(tzinfo=None)
    cases = {
        "UnrecognizedClientException": [
            Aws(svc.client, "KMSAAAAAAAAAAAAAAAAAAAAAAAA", svc.secret).raw(target, body)
        ],
        "InvalidSignatureException": [
            svc.raw(target, body, secret=("y" if svc.secret[0] == "x" else "x") + svc.secret[1:]),
            svc.raw(target, body, service="kms-xks-proxy"),
            svc.raw(target, body, region="eu-west-3"),
            svc.raw(target, body, when=now - timedelta(minutes=6)),
            svc.raw(target, body, when=now + timedelta(minutes=6)),
        ],
        "MissingAuthenticationTokenException": [svc.raw(target, body, sign=False)],
        "IncompleteSignatureException": [
            svc.client.post(
                "/",
                data=body,
                headers={
                    "Content-Type": CT,
                    "X-Amz-Target": target,
                    "Authorization": "AWS4-HMAC-SHA256 Credential=x",
                },
            )
        ],
    }
    for name, responses in cases.items():
        for r in responses:
            assert error_of(r) == name
    # the same signed datakey request twice: the second is refused, retryably
    headers = _signed_once(svc, target, body)
    assert svc.client.post("/", data=body, headers=headers).status_code == 200
    assert error_of(svc.client.post("/", data=body, headers=headers)) == "ThrottlingException"
    # a revoked credential
    r = api.call("DELETE", f"/v1/principals/app/sigv4-credentials/{svc.akid}", api.admin)
    assert r.status_code == 200
    assert error_of(svc.raw(target, body)) == "UnrecognizedClientException"
    # only the revocation and the one good call reached the audit trail
    added = api.audit()[before:]
    assert [r["operation"] for r in added] == ["datakey", "revoke_sigv4_credential"]


def _signed_once(who: Aws, target: str, body: bytes) -> dict[str, str]:
    """Headers of one request signed by botocore without any nonce, as boto3 sends it."""
    request = AWSRequest(
        method="POST",
        url="http://localhost/",
        data=body,
        headers={"Content-Type": CT, "X-Amz-Target": target},
    )
    SigV4Auth(Credentials(who.akid, who.secret), "kms", "us-east-1").add_auth(request)
    return dict(request.headers.items())


def test_replays(api: Api, admin: Aws) -> None:
    """Every signed request is accepted once. A second copy gets ThrottlingException, which
    botocore retries with a fresh signature; a replay by someone else opens nothing."""
    kid = key(api)
    body = json.dumps({"KeyId": kid}).encode()
    for target in ("TrentService.DisableKey", "TrentService.DescribeKey"):
        headers = _signed_once(admin, target, body)
        assert admin.client.post("/", data=body, headers=headers).status_code == 200
        again = admin.client.post("/", data=body, headers=headers)
        assert error_of(again) == "ThrottlingException" and again.status_code == 400


def test_malformed_requests(api: Api, admin: Aws, svc: Aws, svc_headers: Any) -> None:
    kid = key(api, svc_headers)
    before = len(api.audit())
    assert error_of(svc.raw("TrentService.CreateGrant", b"{}")) == "UnknownOperationException"
    assert error_of(svc.raw("Other.Encrypt", b"{}")) == "UnknownOperationException"
    assert error_of(svc.raw("", b"{}")) == "UnknownOperationException"
    big = json.dumps({"KeyId": kid, "Plaintext": "A" * 70_000}).encode()
    assert error_of(svc.raw("TrentService.Encrypt", big)) == "ValidationException"
    assert len(api.audit()) == before  # none of these is an operation of a known caller
    target = "TrentService.Encrypt"
    assert error_of(svc.raw(target, b"{not json")) == "SerializationException"
    assert error_of(svc.raw(target, b"[1, 2]")) == "SerializationException"
    assert (
        error_of(svc.raw(target, b"{}", content_type="application/json")) == "ValidationException"
    )
    p = b64(b"p")
    for bad in (
        {},
        {"KeyId": kid},
        {"KeyId": kid, "Plaintext": ""},
        {"KeyId": kid, "Plaintext": b64(b"x" * 4097)},
        {"KeyId": kid, "Plaintext": p, "Extra": 1},
        {"KeyId": 5, "Plaintext": p},
        {"KeyId": kid, "Plaintext": p, "EncryptionContext": {"a": 1}},
        {"KeyId": kid, "Plaintext": p, "EncryptionContext": {"": "x"}},
        {"KeyId": kid, "Plaintext": p, "GrantTokens": ["t"] * 11},
    ):
        assert svc.error("Encrypt", **bad) == "ValidationException", bad
    assert svc.error(
        "Encrypt", KeyId=kid, Plaintext=p, EncryptionAlgorithm="RSAES_OAEP_SHA_256"
    ) == ("InvalidKeyUsageException")
    assert (
        svc.error("Encrypt", KeyId=kid, Plaintext=p, DryRun=True) == "UnsupportedOperationException"
    )
    assert svc.ok("Encrypt", KeyId=kid, Plaintext=p, GrantTokens=["t"], DryRun=False)
    # no such key: for a service, the answer of a key it holds no grant on
    assert svc.error("Encrypt", KeyId=str(uuid.uuid4()), Plaintext=p) == "AccessDeniedException"
    # not a key reference at all (whatever exists)
    assert svc.error("Encrypt", KeyId=kid.upper(), Plaintext=p) == "NotFoundException"
    foreign = f"arn:aws:kms:us-east-1:111122223333:key/{kid}"
    assert svc.error("Encrypt", KeyId=foreign, Plaintext=p) == "NotFoundException"
    assert svc.error("Encrypt", KeyId="arn:aws:s3:::bucket", Plaintext=p) == "InvalidArnException"
    for field, value in (("Policy", "{}"), ("KeySpec", "RSA_2048"), ("MultiRegion", True)):
        assert admin.error("CreateKey", **{field: value}) == "UnsupportedOperationException"
    assert admin.error("CreateKey", Description="x" * 1025) == "ValidationException"
    assert admin.error("ScheduleKeyDeletion", KeyId=kid, PendingWindowInDays=6) == (
        "ValidationException"
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    op=st.sampled_from(sorted(OPERATIONS)),
    body=st.dictionaries(
        st.sampled_from(sorted({f for o in OPERATIONS.values() for f in o.allowed} | {"Junk"})),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=30),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=6,
        ),
        max_size=6,
    ),
)
def test_no_body_gets_a_server_error(admin: Aws, svc: Aws, op: str, body: dict[str, Any]) -> None:
    """Property: whatever JSON a signed caller sends, the answer is 200 or a 4xx AWS error."""
    for caller in (admin, svc):
        r = caller.call(op, **body)
        if r.status_code != 200:
            assert error_of(r) != "KMSInternalException"


def test_a_database_fault_is_a_retryable_server_error(
    api: Api, svc: Aws, svc_headers: Any, db_path: Path
) -> None:
    kid = key(api, svc_headers)
    with sqlite3.connect(db_path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_records "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    r = svc.call("GenerateDataKey", KeyId=kid, NumberOfBytes=32)
    assert error_of(r, status=500) == "DependencyTimeoutException"
    assert "Plaintext" not in r.get_data(as_text=True)


def test_region_and_account_come_from_the_settings(hsm: Any, storage: Any, data_dir: Path) -> None:
    env = {"KMS_DATA_DIR": str(data_dir), "KMS_AWS_REGION": "eu-west-3"}
    custom = config.from_env({**env, "KMS_AWS_ACCOUNT_ID": "111122223333"})
    assert (custom.aws_region, custom.aws_account_id) == ("eu-west-3", "111122223333")
    app = create_app(custom, hsm=hsm, storage=storage)
    api = Api(app.test_client(), app.extensions["kms"].principals.bootstrap_admin("admin"))
    admin = Aws(app.test_client(), *credential(api, "admin"))
    request = AWSRequest(
        method="POST",
        url="http://localhost/",
        data=b"{}",
        headers={"Content-Type": CT, "X-Amz-Target": "TrentService.CreateKey"},
    )
    SigV4Auth(Credentials(admin.akid, admin.secret), "kms", "eu-west-3").add_auth(request)
    r = admin.client.post("/", data=b"{}", headers=dict(request.headers.items()))
    made = json.loads(r.get_data())["KeyMetadata"]
    assert made["Arn"] == f"arn:aws:kms:eu-west-3:111122223333:key/{made['KeyId']}"
    assert admin.error("ListKeys") == "InvalidSignatureException"  # scoped to us-east-1
    for bad in ({"KMS_AWS_REGION": "Mars"}, {"KMS_AWS_ACCOUNT_ID": "12345"}):
        with pytest.raises(config.ConfigError):
            create_app(config.from_env({**env, **bad}), hsm=hsm, storage=storage)


def test_over_the_rate_limit_is_a_throttling_error(hsm: Any, storage: Any, settings: Any) -> None:
    """ThrottlingException with 400: the one 4xx botocore retries (with backoff)."""
    limited = replace(settings, rate_limits=parse_rate_limits("admin=2/minute"))
    app = create_app(limited, hsm=hsm, storage=storage)
    token = app.extensions["kms"].principals.bootstrap_admin("admin")
    admin = Aws(app.test_client(), *credential(Api(app.test_client(), token), "admin"))
    answers = [admin.call("ListKeys") for _ in range(3)]
    assert answers[0].status_code == 200
    assert error_of(answers[-1]) == "ThrottlingException"
