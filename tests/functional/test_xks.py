"""The XKS proxy API face through the Flask test client, every request signed by botocore's
own SigV4 signer (a client this project did not write), against the real SoftHSM token."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kms import config
from kms.app import create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from kms.errors import HsmUnavailable, IntegrityFailure
from kms.services.clock import SystemClock
from kms.services.principals import PrincipalService
from kms.services.xks import HEALTH_FAILURE_TTL_SECONDS, HEALTH_TTL_SECONDS, XksService
from tests.helpers import Api, b64, unb64

PREFIX = "/example/uri/path/prefix"
PRINCIPAL_ARN = "arn:aws:iam::123456789012:user/Alice"
KEY_ARN = "arn:aws:kms:us-east-2:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def meta(operation: str = "Encrypt", **extra: Any) -> dict[str, Any]:
    return {
        "awsPrincipalArn": PRINCIPAL_ARN,
        "kmsKeyArn": KEY_ARN,
        "kmsOperation": operation,
        "kmsRequestId": str(uuid.uuid4()),
        "kmsViaService": "ebs",
        **extra,
    }


class Xks:
    """Signs each request freshly with botocore (the server refuses replays)."""

    def __init__(self, client: Any, akid: str, secret: str, prefix: str = PREFIX) -> None:
        self.client = client
        self.akid, self.secret, self.prefix = akid, secret, prefix

    def signed(
        self,
        path: str,
        body: Any,
        akid: str | None = None,
        secret: str | None = None,
        service: str = "kms-xks-proxy",
        when: datetime | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = AWSRequest(
            "POST",
            f"http://localhost{path}",
            data=data,
            headers={"Content-Type": "application/json"},
        )
        signer = SigV4Auth(
            Credentials(akid or self.akid, secret or self.secret), service, "us-east-1"
        )
        if when is None:
            signer.add_auth(req)
        else:
            with mock.patch("botocore.auth.get_current_datetime", lambda: when):
                signer.add_auth(req)
        return data, {k: str(v) for k, v in req.headers.items()}

    def post(self, target: str, body: Any, path: str | None = None, **sign: Any) -> Any:
        path = path or f"{self.prefix}/kms/xks/v1/{target}"
        data, headers = self.signed(path, body, **sign)
        return self.client.post(path, data=data, headers=headers)

    def encrypt(self, key: str, plaintext: bytes, aad: bytes | None = None, **extra: Any) -> Any:
        body: dict[str, Any] = {
            "requestMetadata": meta("Encrypt"),
            "plaintext": b64(plaintext),
            "encryptionAlgorithm": "AES_GCM",
            **extra,
        }
        if aad is not None:
            body["additionalAuthenticatedData"] = b64(aad)
        return self.post(f"keys/{key}/encrypt", body)

    def decrypt(
        self, key: str, sealed: dict[str, str], aad: bytes | None = None, **extra: Any
    ) -> Any:
        body: dict[str, Any] = {
            "requestMetadata": meta("Decrypt"),
            "encryptionAlgorithm": "AES_GCM",
            **{k: sealed[k] for k in ("ciphertext", "initializationVector", "authenticationTag")},
            **extra,
        }
        if "ciphertextMetadata" in sealed:
            body["ciphertextMetadata"] = sealed["ciphertextMetadata"]
        if aad is not None:
            body["additionalAuthenticatedData"] = b64(aad)
        return self.post(f"keys/{key}/decrypt", body)


def error(r: Any, status: int, name: str) -> None:
    """The spec's error shape on one line, with that status and name."""
    text = r.get_data(as_text=True)
    assert r.status_code == status, text
    assert "\n" not in text.strip() and r.mimetype == "application/json"
    body = json.loads(text)
    assert body["errorName"] == name, body
    assert set(body) == {"errorName", "errorMessage"}
    assert all(" " <= c <= "~" for c in body["errorMessage"]) and len(body["errorMessage"]) < 512


@pytest.fixture
def xks_settings(settings: config.Settings) -> config.Settings:
    return dataclasses.replace(settings, xks_uri_prefix=PREFIX)


@pytest.fixture
def xapp(xks_settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage) -> Any:
    return create_app(xks_settings, hsm=hsm, storage=storage)


@pytest.fixture
def xapi(xapp: Any) -> Api:
    principals: PrincipalService = xapp.extensions["kms"].principals
    token = principals.bootstrap_admin("admin")
    assert token is not None
    return Api(xapp.test_client(), token)


def issue(api: Api, name: str) -> tuple[str, str]:
    r = api.call("POST", f"/v1/principals/{name}/sigv4-credentials", api.admin)
    assert r.status_code == 201, r.json
    return r.json["access_key_id"], r.json["secret_access_key"]


@pytest.fixture
def svc(xapi: Api) -> dict[str, str]:
    return xapi.principal("service", "aws-xks")


@pytest.fixture
def xks(xapi: Api, svc: dict[str, str]) -> Xks:
    xapi.key("foo", grant=svc, ops=("xks_encrypt", "xks_decrypt"))
    return Xks(xapi.client, *issue(xapi, "aws-xks"))


def set_policy(api: Api, key: str, **policy: Any) -> Any:
    r = api.call("POST", f"/v1/keys/{key}/xks", api.admin, json=policy)
    assert r.status_code == 200, r.json
    return r.json


def records(api: Api, operation: str) -> list[dict[str, Any]]:
    return [r for r in api.audit() if r["operation"] == operation]


# -- health ---------------------------------------------------------------------------------


def test_health_reports_an_active_hsm_and_is_audited(xapi: Api, xks: Xks) -> None:
    body = {"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "hc-1"}}
    r = xks.post("health", body)
    assert r.status_code == 200, r.json
    assert "\n" not in r.get_data(as_text=True)
    out = r.json
    assert out["xksProxyFleetSize"] >= 1 and out["xksProxyVendor"] and out["xksProxyModel"]
    assert out["ekmVendor"]
    assert out["ekmFleetDetails"] == [
        {"id": "hsm-1", "model": out["ekmFleetDetails"][0]["model"], "healthStatus": "ACTIVE"}
    ]
    (record,) = records(xapi, "xks_health")
    assert record["outcome"] == "ok" and record["principal"] == "aws-xks"
    assert record["detail"] == "xks rid=hc-1 op=KmsHealthCheck"


@pytest.mark.parametrize("body", [{}, {"requestMetadata": {}}, {"requestMetadata": []}])
def test_health_needs_request_metadata(xks: Xks, body: Any) -> None:
    error(xks.post("health", body), 400, "ValidationException")


class CountingHsm:
    """The real HSM, counting checks; ``fail`` injects an HSM outage."""

    def __init__(self, real: Pkcs11Hsm) -> None:
        self._real = real
        self.checks = 0
        self.fail: Exception | None = None

    def check(self) -> None:
        self.checks += 1
        if self.fail is not None:
            raise self.fail
        self._real.check()

    def encrypt(self, *args: Any) -> bytes:
        if self.fail is not None:
            raise self.fail
        return self._real.encrypt(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def faulty(xapp: Any, hsm: Pkcs11Hsm, storage: SqlStorage) -> Iterator[tuple[CountingHsm, Ticks]]:
    """The app's XKS service over a CountingHsm and a clock the test moves."""
    services = xapp.extensions["kms"]
    spy, ticks = CountingHsm(hsm), Ticks()
    xks_service = XksService(  # type: ignore[arg-type]
        storage,
        spy,
        services.audit,
        SystemClock(),
        services.xks._runner,
        monotonic=ticks,
        changes=services.changes,
    )
    xapp.extensions["kms"] = dataclasses.replace(services, xks=xks_service)
    yield spy, ticks
    xapp.extensions["kms"] = services


def test_health_check_is_deep_and_cached_at_most_a_minute(xks: Xks, faulty: Any) -> None:
    spy, ticks = faulty
    body = {"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "x"}}

    def health() -> Any:
        body["requestMetadata"]["kmsRequestId"] = str(uuid.uuid4())
        return xks.post("health", body)

    assert health().status_code == 200 and spy.checks == 1
    ticks.now += HEALTH_TTL_SECONDS - 1
    assert health().status_code == 200 and spy.checks == 1  # cached
    assert HEALTH_TTL_SECONDS <= 60
    ticks.now += 2
    assert health().status_code == 200 and spy.checks == 2  # checked again
    spy.fail = HsmUnavailable(detail="token removed")
    ticks.now += HEALTH_TTL_SECONDS + 1
    error(health(), 503, "DependencyTimeoutException")
    spy.fail = None
    error(health(), 503, "DependencyTimeoutException")  # the failure is cached briefly
    assert spy.checks == 3
    ticks.now += HEALTH_FAILURE_TTL_SECONDS + 1
    assert health().status_code == 200 and spy.checks == 4


def test_hsm_faults_answer_spec_errors_not_tracebacks(xapi: Api, xks: Xks, faulty: Any) -> None:
    spy, _ = faulty
    for fault, status, name in (
        (HsmUnavailable(detail="device error"), 503, "DependencyTimeoutException"),
        (IntegrityFailure("KEK unwrap failed"), 500, "InternalException"),
        (RuntimeError("library bug"), 500, "InternalException"),
    ):
        spy.fail = fault
        r = xks.encrypt("foo", b"secret payload")
        error(r, status, name)
        assert "Traceback" not in r.get_data(as_text=True)
    failed = records(xapi, "xks_encrypt")
    assert [r["outcome"] for r in failed] == ["hsm_unavailable", "key_unusable", "internal_error"]
    assert all(r["detail"].startswith("xks rid=") for r in failed)


# -- metadata -------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["CreateKey", "DescribeKey", "SomeFutureOperation"])
def test_metadata_of_a_key_by_alias_and_by_id(xapi: Api, xks: Xks, operation: str) -> None:
    body = {"requestMetadata": meta(operation, awsSourceVpc="vpc-1", newField={"x": 1})}
    r = xks.post("keys/foo/metadata", body)
    assert r.status_code == 200, r.json
    assert r.get_data(as_text=True) == (
        '{"keySpec":"AES_256","keyUsage":["ENCRYPT","DECRYPT"],"keyStatus":"ENABLED"}'
    )
    key_id = xapi.call("GET", "/v1/keys/foo", xapi.admin).json["key_id"]
    assert xks.post(f"keys/{key_id}/metadata", {"requestMetadata": meta()}).json == r.json


def test_metadata_reports_disabled_keys_and_restricted_usage(xapi: Api, xks: Xks) -> None:
    set_policy(xapi, "foo", usage=["encrypt"])
    assert xks.post("keys/foo/metadata", {"requestMetadata": meta()}).json["keyUsage"] == [
        "ENCRYPT"
    ]
    set_policy(xapi, "foo", usage=[])
    assert xks.post("keys/foo/metadata", {"requestMetadata": meta()}).json["keyUsage"] == []
    assert xapi.call("POST", "/v1/keys/foo/disable", xapi.admin).status_code == 200
    assert (
        xks.post("keys/foo/metadata", {"requestMetadata": meta()}).json["keyStatus"] == "DISABLED"
    )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"requestMetadata": {}},
        {"requestMetadata": {"kmsOperation": "CreateKey", "kmsRequestId": "r"}},  # no principal
        {"requestMetadata": meta(kmsRequestId="")},
        {"requestMetadata": meta(kmsOperation=7)},
        {"requestMetadata": meta(awsPrincipalArn="a" * 2049)},
        {"requestMetadata": meta(awsSourceVpce=["vpce"])},
        [],
        b"{not json",
        b"\xff\xfe",
    ],
)
def test_metadata_refuses_bad_bodies(xks: Xks, body: Any) -> None:
    error(xks.post("keys/foo/metadata", body), 400, "ValidationException")


def test_unknown_key_is_key_not_found(xks: Xks) -> None:
    error(
        xks.post("keys/non_existing_key/metadata", {"requestMetadata": meta()}),
        404,
        "KeyNotFoundException",
    )
    error(xks.encrypt("non_existing_key", b"x"), 404, "KeyNotFoundException")


# -- encrypt / decrypt ----------------------------------------------------------------------


def test_round_trip_with_aad_and_cdiv(xapi: Api, xks: Xks) -> None:
    aad = b"project=nile,department=marketing"
    r = xks.encrypt("foo", b"Hello World!", aad, ciphertextDataIntegrityValueAlgorithm="SHA_256")
    assert r.status_code == 200, r.json
    out = r.json
    assert "\n" not in r.get_data(as_text=True)
    assert set(out) == {
        "authenticationTag",
        "ciphertext",
        "ciphertextMetadata",
        "initializationVector",
        "ciphertextDataIntegrityValue",
    }
    assert len(unb64(out["ciphertext"])) == len(b"Hello World!")
    assert len(unb64(out["initializationVector"])) == 12
    assert len(unb64(out["authenticationTag"])) == 16
    assert len(unb64(out["ciphertextMetadata"])) <= 20
    # the spec's CDIV, recomputed here from the response alone
    fields = ("ciphertextMetadata", "initializationVector", "ciphertext", "authenticationTag")
    expected = hashlib.sha256(aad + b"".join(unb64(out[f]) for f in fields)).digest()
    assert unb64(out["ciphertextDataIntegrityValue"]) == expected
    d = xks.decrypt("foo", out, aad)
    assert d.status_code == 200 and d.get_data(as_text=True) == '{"plaintext":"SGVsbG8gV29ybGQh"}'
    plain = xks.encrypt("foo", b"no aad")
    assert "ciphertextDataIntegrityValue" not in plain.json
    assert unb64(xks.decrypt("foo", plain.json).json["plaintext"]) == b"no aad"
    assert unb64(xks.decrypt("foo", plain.json, b"").json["plaintext"]) == b"no aad"


def test_spec_minimum_sizes_work_and_larger_is_unsupported(xks: Xks) -> None:
    plaintext, aad = bytes(range(256)) * 16 + b"x" * 204, b"a" * 8192
    assert len(plaintext) == 4300
    out = xks.encrypt("foo", plaintext, aad).json
    assert unb64(xks.decrypt("foo", out, aad).json["plaintext"]) == plaintext
    big = xks.encrypt("foo", b"p" * 8192, b"a" * 16384)
    assert big.status_code == 200
    error(xks.encrypt("foo", b"p" * 8193), 501, "UnsupportedOperationException")
    error(xks.encrypt("foo", b"p", b"a" * 16385), 501, "UnsupportedOperationException")
    error(xks.encrypt("foo", b"p", extra="e" * 140_000), 501, "UnsupportedOperationException")


def test_decrypt_corruption_checklist_is_one_error(xks: Xks, xapi: Api, svc: Any) -> None:
    aad = b"context"
    out = xks.encrypt("foo", b"the data key", aad).json
    assert xks.decrypt("foo", out, aad).status_code == 200

    def flip(field: str, index: int = -1) -> dict[str, str]:
        raw = bytearray(unb64(out[field]))
        raw[index] ^= 1
        return {**out, field: b64(bytes(raw))}

    xapi.key("other", grant=svc, ops=("xks_encrypt", "xks_decrypt"))
    bad = [
        ("foo", flip("ciphertext"), aad),  # flipped last byte
        ("foo", flip("ciphertext", 0), aad),
        ("foo", flip("authenticationTag"), aad),
        ("foo", flip("initializationVector"), aad),
        ("foo", flip("ciphertextMetadata"), aad),  # another version
        ("foo", flip("ciphertextMetadata", 0), aad),  # unknown metadata format
        ("foo", {**out, "ciphertext": b64(unb64(out["ciphertext"])[:-1])}, aad),  # truncated
        ("foo", {**out, "initializationVector": b64(bytes(16))}, aad),
        ("foo", {k: v for k, v in out.items() if k != "ciphertextMetadata"}, aad),
        ("foo", out, None),  # missing AAD
        ("foo", out, b"context2"),  # wrong AAD
        ("other", out, aad),  # wrong key
    ]
    for key, sealed, a in bad:
        error(xks.decrypt(key, sealed, a), 400, "InvalidCiphertextException")


@pytest.mark.parametrize(
    ("change", "status", "name"),
    [
        ({"plaintext": None}, 400, "ValidationException"),
        ({"plaintext": "not base64!"}, 400, "ValidationException"),
        ({"plaintext": "QQ"}, 400, "ValidationException"),  # missing padding
        ({"plaintext": 12}, 400, "ValidationException"),
        ({"encryptionAlgorithm": "AES_CBC"}, 400, "ValidationException"),
        ({"encryptionAlgorithm": None}, 400, "ValidationException"),
        ({"ciphertextDataIntegrityValueAlgorithm": "MD5"}, 400, "ValidationException"),
        ({"additionalAuthenticatedData": {"a": 1}}, 400, "ValidationException"),
        ({"requestMetadata": meta(kmsKeyArn=None)}, 400, "ValidationException"),
        ({"requestMetadata": meta(awsPrincipalArn=None)}, 400, "ValidationException"),
    ],
)
def test_encrypt_refuses_bad_fields(
    xks: Xks, change: dict[str, Any], status: int, name: str
) -> None:
    body = {"requestMetadata": meta(), "plaintext": b64(b"p"), "encryptionAlgorithm": "AES_GCM"}
    body.update(change)
    error(
        xks.post("keys/foo/encrypt", {k: v for k, v in body.items() if v is not None}), status, name
    )


@pytest.mark.parametrize(
    "change",
    [
        {"initializationVector": b64(bytes(8))},
        {"authenticationTag": b64(bytes(12))},
        {"ciphertextMetadata": b64(bytes(21))},
        {"ciphertext": None},
        {"authenticationTag": None},
        {"initializationVector": "%%%"},
    ],
)
def test_decrypt_refuses_bad_fields(xks: Xks, change: dict[str, Any]) -> None:
    out = xks.encrypt("foo", b"p").json
    body = {"requestMetadata": meta("Decrypt"), "encryptionAlgorithm": "AES_GCM", **out, **change}
    error(
        xks.post("keys/foo/decrypt", {k: v for k, v in body.items() if v is not None}),
        400,
        "ValidationException",
    )


def test_unknown_fields_and_operations_are_accepted(xks: Xks) -> None:
    r = xks.encrypt(
        "foo", b"p", requestMetadata=meta("BulkEncrypt", futureField="x"), futureTopLevel=[1]
    )
    assert r.status_code == 200, r.json


# -- paths, methods, authentication ---------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"{PREFIX}/invalid/kms/xks/v1/health",  # wrong prefix
        "/kms/xks/v1/health",  # no prefix
        f"{PREFIX}/kms/xks/v1/nothing",  # unknown path under the prefix
        f"{PREFIX}/kms/xks/v2/health",
        f"{PREFIX}/kms/xks/v1/keys/foo/sign",
        f"{PREFIX}/kms/xks/v1/keys/foo/encrypt/",
        f"{PREFIX}/kms/xks/v1/keys/a%20b/encrypt",  # not an externalKeyId
        f"{PREFIX}/kms/xks/v1/keys/{'k' * 129}/metadata",
    ],
)
def test_bad_paths_are_invalid_uri_path_before_authentication(xks: Xks, path: str) -> None:
    error(xks.client.post(path, json={}), 404, "InvalidUriPathException")  # unsigned
    error(xks.post("", {"requestMetadata": meta()}, path=path), 404, "InvalidUriPathException")


@pytest.mark.parametrize(
    "target", ["health", "keys/foo/metadata", "keys/foo/encrypt", "keys/foo/decrypt"]
)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS"])
def test_only_post_is_allowed(xks: Xks, target: str, method: str) -> None:
    r = xks.client.open(f"{PREFIX}/kms/xks/v1/{target}", method=method)
    error(r, 405, "UnsupportedOperationException")
    assert r.headers["Allow"] == "POST"


def test_authentication_failures(xapi: Api, xks: Xks) -> None:
    body = {"requestMetadata": meta("CreateKey")}
    path = f"{PREFIX}/kms/xks/v1/keys/foo/metadata"
    error(xks.client.post(path, json=body), 401, "AuthenticationFailedException")
    error(
        xks.post("keys/foo/metadata", body, akid="Invalid" + xks.akid),
        401,
        "AuthenticationFailedException",
    )
    error(
        xks.post("keys/foo/metadata", body, secret="Invalid" + xks.secret),
        401,
        "AuthenticationFailedException",
    )
    error(xks.post("keys/foo/metadata", body, service="kms"), 401, "AuthenticationFailedException")
    old = datetime.now(UTC) - timedelta(minutes=6)
    error(xks.post("keys/foo/metadata", body, when=old), 401, "AuthenticationFailedException")
    data, headers = xks.signed(path, body)
    assert xks.client.post(path, data=data, headers=headers).status_code == 200
    replayed = xks.client.post(path, data=data, headers=headers)
    error(replayed, 401, "AuthenticationFailedException")
    assert records(xapi, "xks_metadata")[-1]["outcome"] == "ok"  # refusals are logged only


def test_credentials_rotate_and_revoke(xapi: Api, xks: Xks) -> None:
    second = Xks(xapi.client, *issue(xapi, "aws-xks"))

    def body() -> dict[str, Any]:
        return {"requestMetadata": meta("CreateKey")}  # a fresh kmsRequestId: no replay

    assert xks.post("keys/foo/metadata", body()).status_code == 200
    assert second.post("keys/foo/metadata", body()).status_code == 200
    r = xapi.call("DELETE", f"/v1/principals/aws-xks/sigv4-credentials/{xks.akid}", xapi.admin)
    assert r.status_code == 200
    error(xks.post("keys/foo/metadata", body()), 401, "AuthenticationFailedException")
    assert second.post("keys/foo/metadata", body()).status_code == 200


def test_empty_prefix_serves_at_the_root(api: Api) -> None:
    svc = api.principal("service", "aws-xks")
    api.key("foo", grant=svc, ops=("xks_encrypt", "xks_decrypt"))
    xks = Xks(api.client, *issue(api, "aws-xks"), prefix="")
    assert xks.post("keys/foo/metadata", {"requestMetadata": meta()}).status_code == 200
    error(
        xks.post("", {"requestMetadata": meta()}, path=f"{PREFIX}/kms/xks/v1/health"),
        404,
        "InvalidUriPathException",
    )
    assert api.call("GET", "/v1/nothing-here", api.admin).json["error"]["code"] == "not_found"


# -- authorization, policy, usage, key state ------------------------------------------------


def test_grants_decide_which_principal_may_do_what(xapi: Api, xks: Xks, svc: Any) -> None:
    xapi.key("enc-only-grant", grant=svc, ops=("xks_encrypt",))
    xapi.key("no-grant")
    out = xks.encrypt("enc-only-grant", b"p").json
    error(xks.decrypt("enc-only-grant", out), 403, "AccessDeniedException")
    # no grant at all on the key: the answer of a key that does not exist
    error(xks.encrypt("no-grant", b"p"), 404, "KeyNotFoundException")
    error(
        xks.post("keys/no-grant/metadata", {"requestMetadata": meta()}),
        404,
        "KeyNotFoundException",
    )
    xapi.call("POST", "/v1/principals", xapi.admin, json={"name": "ops", "role": "admin"})
    admin_xks = Xks(xapi.client, *issue(xapi, "ops"))
    error(admin_xks.encrypt("foo", b"p"), 403, "AccessDeniedException")
    health = {"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "r"}}
    assert admin_xks.post("health", health).status_code == 200  # health: a valid signature


def test_xks_grants_open_nothing_through_the_other_faces(xapi: Api, xks: Xks, svc: Any) -> None:
    """AWS's XKS credential (grants xks_encrypt, xks_decrypt) cannot decrypt the data
    owner's native blobs under the same key, natively or through the AWS KMS face; and a
    native decrypt grant gives nothing through XKS."""
    owner = xapi.principal("service", "owner")
    grant = {"principal": "owner", "operations": ["datakey", "decrypt"]}
    assert xapi.call("POST", "/v1/keys/foo/grants", xapi.admin, json=grant).status_code == 200
    blob = xapi.call("POST", "/v1/keys/foo/datakey", owner, json={}).json["ciphertext"]
    native = xapi.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob})
    assert native.status_code == 403
    body = json.dumps({"CiphertextBlob": blob}).encode()
    request = AWSRequest(
        method="POST",
        url="http://localhost/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService.Decrypt",
        },
    )
    SigV4Auth(Credentials(xks.akid, xks.secret), "kms", "us-east-1").add_auth(request)
    aws = xapi.client.post("/", data=body, headers=dict(request.headers.items()))
    assert aws.status_code == 400 and json.loads(aws.data)["__type"] == "AccessDeniedException"
    owner_xks = Xks(xapi.client, *issue(xapi, "owner"))
    error(
        owner_xks.post("keys/foo/metadata", {"requestMetadata": meta()}),
        403,
        "AccessDeniedException",
    )


def test_policy_refuses_by_principal_and_by_operation(xapi: Api, xks: Xks) -> None:
    set_policy(xapi, "foo", aws_principals=["arn:aws:iam::123456789012:role/app-*"])
    error(xks.encrypt("foo", b"p"), 403, "AccessDeniedException")  # user/Alice
    app_role = meta(awsPrincipalArn="arn:aws:iam::123456789012:role/app-web")
    assert xks.encrypt("foo", b"p", requestMetadata=app_role).status_code == 200
    error(xks.post("keys/foo/metadata", {"requestMetadata": meta()}), 403, "AccessDeniedException")
    set_policy(xapi, "foo", kms_operations=["Encrypt", "GenerateDataKey"])
    out = xks.encrypt("foo", b"p").json
    error(xks.decrypt("foo", out), 403, "AccessDeniedException")
    error(
        xks.encrypt("foo", b"p", requestMetadata=meta("NewKmsOperation")),
        403,
        "AccessDeniedException",
    )
    refused = [r for r in records(xapi, "xks_decrypt") if r["outcome"] == "forbidden"]
    assert "xks policy refuses kmsOperation" in refused[-1]["detail"]
    assert (
        "op=Decrypt" in refused[-1]["detail"] and "principal=arn:aws:iam::" in refused[-1]["detail"]
    )


def test_usage_restrictions_give_invalid_key_usage(xapi: Api, xks: Xks, svc: Any) -> None:
    for alias, usage in (("enc", ["encrypt"]), ("dec", ["decrypt"]), ("none", [])):
        xapi.key(alias, grant=svc, ops=("xks_encrypt", "xks_decrypt"))
        set_policy(xapi, alias, usage=usage)
    out = xks.encrypt("enc", b"p", b"aad").json
    error(xks.decrypt("enc", out, b"aad"), 400, "InvalidKeyUsageException")
    cdiv = {"ciphertextDataIntegrityValueAlgorithm": "SHA_256"}
    error(xks.encrypt("enc", b"p", **cdiv), 400, "InvalidKeyUsageException")
    for alias in ("dec", "none"):
        for aad in (None, b"aad"):
            error(xks.encrypt(alias, b"p", aad), 400, "InvalidKeyUsageException")
            error(xks.encrypt(alias, b"p", aad, **cdiv), 400, "InvalidKeyUsageException")
    error(xks.decrypt("none", out), 400, "InvalidKeyUsageException")
    # a ciphertext of a decrypt-only key made while it could encrypt still opens
    set_policy(xapi, "dec", usage=["encrypt", "decrypt"])
    sealed = xks.encrypt("dec", b"old").json
    set_policy(xapi, "dec", usage=["decrypt"])
    assert unb64(xks.decrypt("dec", sealed).json["plaintext"]) == b"old"


def test_disabled_key_and_retired_version_are_invalid_state(xapi: Api, xks: Xks) -> None:
    v1 = xks.encrypt("foo", b"version one").json
    assert xapi.call("POST", "/v1/keys/foo/rotate", xapi.admin).json["current_version"] == 2
    v2 = xks.encrypt("foo", b"version two").json
    assert v1["ciphertextMetadata"] != v2["ciphertextMetadata"]
    assert unb64(xks.decrypt("foo", v1).json["plaintext"]) == b"version one"  # old version
    r = xapi.call("POST", "/v1/keys/foo/config", xapi.admin, json={"min_decryption_version": 2})
    assert r.status_code == 200, r.json
    error(xks.decrypt("foo", v1), 400, "InvalidStateException")
    assert unb64(xks.decrypt("foo", v2).json["plaintext"]) == b"version two"
    assert xapi.call("POST", "/v1/keys/foo/disable", xapi.admin).status_code == 200
    error(xks.encrypt("foo", b"p"), 400, "InvalidStateException")
    error(xks.decrypt("foo", v2), 400, "InvalidStateException")
    r = xapi.call("POST", "/v1/keys/foo/schedule-deletion", xapi.admin, json={"pending_days": 7})
    assert r.status_code == 200, r.json
    error(xks.decrypt("foo", v2), 400, "InvalidStateException")
    decrypts = records(xapi, "xks_decrypt")
    assert [r["key_version"] for r in decrypts] == [1, 1, 2, 2, 2]
    assert [r["outcome"] for r in decrypts] == [
        "ok",
        "key_version_retired",
        "ok",
        "key_state",
        "key_state",
    ]


# -- audit ----------------------------------------------------------------------------------


def test_audit_records_carry_the_request_metadata_and_no_plaintext(xapi: Api, xks: Xks) -> None:
    secret = b"plaintext-that-must-never-be-logged"
    m = meta("GenerateDataKey")
    out = xks.encrypt("foo", secret, b"aad", requestMetadata=m).json
    d = meta("Decrypt")
    assert xks.decrypt("foo", out, b"aad", requestMetadata=d).status_code == 200
    bad = meta("Encrypt")
    error(
        xks.post("keys/foo/encrypt", {"requestMetadata": bad, "encryptionAlgorithm": "AES_GCM"}),
        400,
        "ValidationException",
    )
    key_id = xapi.call("GET", "/v1/keys/foo", xapi.admin).json["key_id"]
    enc, dec = records(xapi, "xks_encrypt"), records(xapi, "xks_decrypt")
    assert enc[0]["detail"] == (
        f"xks rid={m['kmsRequestId']} op=GenerateDataKey principal={PRINCIPAL_ARN} "
        f"key={KEY_ARN} via=ebs"
    )
    assert (enc[0]["key_id"], enc[0]["key_version"], enc[0]["principal"]) == (key_id, 1, "aws-xks")
    assert dec[0]["detail"].startswith(f"xks rid={d['kmsRequestId']} op=Decrypt ")
    assert dec[0]["justification"] == "service_processing"
    assert enc[1]["outcome"] == "invalid_request"
    assert (
        enc[1]["detail"].startswith(f"xks rid={bad['kmsRequestId']} ")
        and "plaintext" in enc[1]["detail"]
    )
    everything = json.dumps(xapi.audit())
    for leak in (secret.decode(), b64(secret), out["ciphertext"]):
        assert leak not in everything


def test_no_result_without_its_audit_record(xapi: Api, xks: Xks, db_path: Path) -> None:
    out = xks.encrypt("foo", b"p").json
    with sqlite3.connect(db_path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_records "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    for r in (xks.encrypt("foo", b"p"), xks.decrypt("foo", out)):
        error(r, 503, "DependencyTimeoutException")
        assert "plaintext" not in r.get_data(as_text=True)


def test_replay_store_down_fails_closed(xks: Xks, db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON sigv4_nonces "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    error(xks.encrypt("foo", b"p"), 503, "DependencyTimeoutException")


# -- the policy endpoint and the settings ---------------------------------------------------


def test_policy_endpoint(xapi: Api, xks: Xks, svc: Any) -> None:
    assert xapi.call("GET", "/v1/keys/foo/xks", xapi.admin).json == {
        "key": "foo",
        "key_id": xapi.call("GET", "/v1/keys/foo", xapi.admin).json["key_id"],
        "usage": ["encrypt", "decrypt"],
        "aws_principals": None,
        "kms_operations": None,
    }
    out = set_policy(xapi, "foo", usage=["decrypt"], kms_operations=["Decrypt"])
    assert out["usage"] == ["decrypt"] and out["kms_operations"] == ["Decrypt"]
    assert xapi.call("GET", "/v1/keys/foo/xks", xapi.admin).json["kms_operations"] == ["Decrypt"]
    (record,) = records(xapi, "set_xks_policy")
    assert record["detail"] == "usage=decrypt kms_operations=Decrypt aws_principals=any"
    for body in (
        {"usage": ["sign"]},
        {"usage": "encrypt"},
        {"kms_operations": ["Decrypt!"]},
        {"aws_principals": [""]},
        {"other": 1},
    ):
        r = xapi.call("POST", "/v1/keys/foo/xks", xapi.admin, json=body)
        assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request", body
    assert xapi.call("POST", "/v1/keys/foo/xks", svc, json={}).status_code == 403
    assert xapi.call("POST", "/v1/keys/nope/xks", xapi.admin, json={}).status_code == 404


def test_settings_validate_prefix_and_tls(tmp_path: Path, data_dir: Path) -> None:
    base = {"KMS_DATA_DIR": str(data_dir)}
    assert config.from_env(base).xks_uri_prefix == ""
    assert (
        config.from_env({**base, "KMS_XKS_URI_PREFIX": "/tenant-a"}).xks_uri_prefix == "/tenant-a"
    )
    for bad in ("tenant", "/tenant/", "/v1", "/a.b"):
        with pytest.raises(config.ConfigError, match="KMS_XKS_URI_PREFIX"):
            config.from_env({**base, "KMS_XKS_URI_PREFIX": bad})
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert")
    key.write_text("key")
    key.chmod(0o644)
    with pytest.raises(config.ConfigError, match="both"):
        config.from_env({**base, "KMS_TLS_CERT_FILE": str(cert)})
    tls = {**base, "KMS_TLS_CERT_FILE": str(cert), "KMS_TLS_KEY_FILE": str(key)}
    with pytest.raises(config.ConfigError, match="chmod 600"):
        config.from_env(tls)
    key.chmod(0o600)
    settings = config.from_env(tls)
    assert (settings.tls_cert_file, settings.tls_key_file) == (str(cert), str(key))
    with pytest.raises(config.ConfigError, match="no such file"):
        config.from_env({**tls, "KMS_TLS_CERT_FILE": str(tmp_path / "missing.pem")})
