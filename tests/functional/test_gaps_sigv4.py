"""Issue 16, gaps 2 and 3: what a SigV4 signature must cover and where it must be scoped.

Gap 2: the AWS KMS face acts only on requests whose ``X-Amz-Target`` (the operation) and
``Content-Type`` (how the body is read) are among the signed headers, as botocore signs
them; otherwise anyone who sees a signed request in flight could turn a DescribeKey into a
DisableKey. Gap 3: the XKS face accepts only SigV4 scopes of its configured region
(KMS_XKS_REGION, default KMS_AWS_REGION). Requests signed by botocore, real SoftHSM."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kms import config
from kms.app import create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from tests.functional.test_aws_kms import CT, credential
from tests.functional.test_xks import PREFIX, issue, meta
from tests.helpers import Api, b64


def _aws_request(
    akid: str, secret: str, target: str, body: dict[str, Any], unsigned: tuple[str, ...]
) -> tuple[dict[str, str], bytes]:
    """A request to the AWS KMS face signed by botocore over every header but ``unsigned``
    (added after signing, as a party in the middle would)."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": CT, "X-Amz-Target": target, "X-Client-Nonce": uuid.uuid4().hex}
    signed_part = {k: v for k, v in headers.items() if k not in unsigned}
    request = AWSRequest(method="POST", url="http://localhost/", data=data, headers=signed_part)
    SigV4Auth(Credentials(akid, secret), "kms", "us-east-1").add_auth(request)
    sent = dict(request.headers.items())
    sent.update({k: v for k, v in headers.items() if k in unsigned})
    return sent, data


def _signed_headers(headers: dict[str, str]) -> list[str]:
    auth = headers["Authorization"]
    return auth.split("SignedHeaders=", 1)[1].split(",", 1)[0].split(";")


@pytest.fixture
def admin(api: Api) -> tuple[str, str]:
    return credential(api, "admin")


@pytest.mark.parametrize(
    "unsigned", [("X-Amz-Target",), ("Content-Type",), ("Content-Type", "X-Amz-Target")]
)
def test_aws_face_refuses_an_unsigned_target_or_content_type(
    app: Any, api: Api, admin: tuple[str, str], unsigned: tuple[str, ...]
) -> None:
    """A DescribeKey signed without its X-Amz-Target, the target then changed to
    DisableKey (same body): refused before anything is done or audited."""
    key_id = api.key()
    headers, data = _aws_request(*admin, "TrentService.DisableKey", {"KeyId": key_id}, unsigned)
    assert not {h.lower() for h in unsigned} & set(_signed_headers(headers))
    r = app.test_client().post("/", data=data, headers=headers)
    assert r.status_code == 400, r.get_data(as_text=True)
    body = json.loads(r.get_data())
    assert body["__type"] == "InvalidSignatureException"
    assert "'Content-Type' and 'X-Amz-Target' must be 'SignedHeaders'" in body["message"]
    assert api.call("GET", f"/v1/keys/{key_id}", api.admin).json["state"] == "enabled"
    # failed authentication is logged, never chained
    assert r.headers["X-Request-Id"] not in {rec["request_id"] for rec in api.audit()}


def test_aws_face_accepts_what_botocore_signs(app: Any, api: Api, admin: tuple[str, str]) -> None:
    key_id = api.key()
    headers, data = _aws_request(*admin, "TrentService.DisableKey", {"KeyId": key_id}, ())
    assert {"content-type", "x-amz-target", "host", "x-amz-date"} <= set(_signed_headers(headers))
    r = app.test_client().post("/", data=data, headers=headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert api.call("GET", f"/v1/keys/{key_id}", api.admin).json["state"] == "disabled"


# -- gap 3: the XKS face's region ----------------------------------------------------------


def _xks_post(client: Any, akid: str, secret: str, target: str, body: Any, region: str) -> Any:
    path = f"{PREFIX}/kms/xks/v1/{target}"
    data = json.dumps(body).encode()
    request = AWSRequest(
        "POST", f"http://localhost{path}", data=data, headers={"Content-Type": "application/json"}
    )
    SigV4Auth(Credentials(akid, secret), "kms-xks-proxy", region).add_auth(request)
    return client.post(path, data=data, headers={k: str(v) for k, v in request.headers.items()})


def _xks_world(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, **changes: Any
) -> tuple[Api, tuple[str, str]]:
    app = create_app(
        dataclasses.replace(settings, xks_uri_prefix=PREFIX, **changes), hsm=hsm, storage=storage
    )
    token = app.extensions["kms"].principals.bootstrap_admin("admin")
    api = Api(app.test_client(), token)
    svc = api.principal("service", "aws-xks")
    api.key("foo", grant=svc, ops=("xks_encrypt", "xks_decrypt"))
    return api, issue(api, "aws-xks")


def _encrypt(api: Api, creds: tuple[str, str], region: str) -> Any:
    body = {
        "requestMetadata": meta("Encrypt"),
        "plaintext": b64(b"p"),
        "encryptionAlgorithm": "AES_GCM",
    }
    return _xks_post(api.client, *creds, "keys/foo/encrypt", body, region)


def test_xks_face_refuses_a_scope_of_another_region(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage
) -> None:
    api, creds = _xks_world(settings, hsm, storage)
    assert settings.xks_region == settings.aws_region == "us-east-1"
    assert _encrypt(api, creds, "us-east-1").status_code == 200
    refused = []
    for region in ("eu-west-3", "us-east-2", "aa-bbbb-9"):
        r = _encrypt(api, creds, region)
        assert r.status_code == 401, r.get_data(as_text=True)
        assert r.json["errorName"] == "AuthenticationFailedException"
        refused.append(r.headers["X-Request-Id"])
    health = {"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "r"}}
    r = _xks_post(api.client, *creds, "health", health, "eu-west-3")
    assert r.status_code == 401 and r.json["errorName"] == "AuthenticationFailedException"
    refused.append(r.headers["X-Request-Id"])
    # failed authentication is logged, never chained; nothing was encrypted
    records = api.audit()
    assert not set(refused) & {rec["request_id"] for rec in records}
    assert [rec["outcome"] for rec in records if rec["operation"] == "xks_encrypt"] == ["ok"]


def test_xks_region_is_its_own_setting(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage
) -> None:
    api, creds = _xks_world(settings, hsm, storage, xks_region="eu-west-3")
    assert _encrypt(api, creds, "eu-west-3").status_code == 200
    r = _encrypt(api, creds, "us-east-1")
    assert r.status_code == 401 and r.json["errorName"] == "AuthenticationFailedException"
    # the AWS KMS face keeps KMS_AWS_REGION
    headers, data = _aws_request(*credential(api, "admin"), "TrentService.ListKeys", {}, ())
    assert api.client.post("/", data=data, headers=headers).status_code == 200


def test_xks_region_setting(data_dir: Any) -> None:
    base = {"KMS_DATA_DIR": str(data_dir)}
    assert config.from_env(base).xks_region == "us-east-1"
    assert config.from_env({**base, "KMS_AWS_REGION": "eu-west-3"}).xks_region == "eu-west-3"
    both = {**base, "KMS_AWS_REGION": "eu-west-3", "KMS_XKS_REGION": "eu-central-1"}
    assert (config.from_env(both).aws_region, config.from_env(both).xks_region) == (
        "eu-west-3",
        "eu-central-1",
    )
    for bad in ("EU-WEST-3", "eu-west", "*", "eu-west-3 "):
        with pytest.raises(config.ConfigError, match="KMS_XKS_REGION"):
            config.from_env({**base, "KMS_XKS_REGION": bad})
