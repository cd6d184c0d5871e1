"""Issue 16, gaps 1 to 3 against a live gunicorn server (2 workers), driven by boto3 and
requests signed by botocore: a service without a grant gets one answer whether a key
exists or not; the AWS KMS face needs ``X-Amz-Target`` and ``Content-Type`` signed (boto3
signs both, so it keeps working); the XKS face refuses another region's scope."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import boto3
import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.helpers import Server

pytestmark = pytest.mark.e2e
REGION = "us-east-1"


class Native:
    def __init__(self, server: Server) -> None:
        self.url = server.url
        self.headers = {"Authorization": f"Bearer {server.admin_token}"}

    def call(self, path: str, body: Any, status: int = 200, headers: Any = None) -> Any:
        r = requests.post(self.url + path, json=body, headers=headers or self.headers, timeout=30)
        assert r.status_code == status, r.text
        return r.json()

    def principal(self, name: str) -> dict[str, str]:
        made = self.call("/v1/principals", {"name": name, "role": "service"}, 201)
        return {"Authorization": f"Bearer {made['token']}"}

    def credential(self, name: str) -> tuple[str, str]:
        made = self.call(f"/v1/principals/{name}/sigv4-credentials", None, 201)
        return made["access_key_id"], made["secret_access_key"]

    def key(self, alias: str, grantee: str, ops: list[str]) -> str:
        key_id = str(self.call("/v1/keys", {"alias": alias}, 201)["key_id"])
        self.call(f"/v1/keys/{key_id}/grants", {"principal": grantee, "operations": ops})
        return key_id


def kms(server: Server, credential: tuple[str, str]) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=server.url,
        region_name=REGION,
        aws_access_key_id=credential[0],
        aws_secret_access_key=credential[1],
        config=Config(retries={"mode": "legacy"}),
    )


def error(call: Any, **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(ClientError) as e:
        call(**kwargs)
    err = e.value.response["Error"]
    return err["Code"], err["Message"]


def test_a_service_without_a_grant_learns_nothing_about_keys(server: Server) -> None:
    native = Native(server)
    owner = native.principal("owner-e2e")
    native.principal("app-e2e")
    native.key("mine-e2e", "app-e2e", ["datakey", "encrypt", "decrypt", "rewrap"])
    theirs = native.key("theirs-e2e", "owner-e2e", ["encrypt"])
    blob = native.call("/v1/keys/theirs-e2e/encrypt", {"plaintext": "cA=="}, headers=owner)
    unknown = str(uuid.uuid4())
    app = kms(server, native.credential("app-e2e"))
    refs = [theirs, "alias/theirs-e2e", unknown, "alias/ghost-e2e"]
    for call, extra in (
        (app.encrypt, {"Plaintext": b"p"}),
        (app.generate_data_key, {"KeySpec": "AES_256"}),
        (app.describe_key, {}),
    ):
        answers = {error(call, KeyId=ref, **extra) for ref in refs}
        assert len(answers) == 1, answers
        assert next(iter(answers))[0] == "AccessDeniedException"
    raw = base64.b64decode(blob["ciphertext"])
    ghost = raw.replace(theirs.encode(), unknown.encode())
    answers = {error(app.decrypt, CiphertextBlob=b) for b in (raw, ghost)}
    answers |= {error(app.decrypt, CiphertextBlob=raw, KeyId=k) for k in refs}
    assert len(answers) == 1 and next(iter(answers))[0] == "AccessDeniedException", answers
    # the admin is told precisely
    admin = kms(server, native.credential("admin"))
    with pytest.raises(admin.exceptions.NotFoundException):
        admin.describe_key(KeyId="alias/ghost-e2e")


def _raw(server: Server, cred: tuple[str, str], target: str, unsigned: tuple[str, ...]) -> Any:
    headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target}
    data = b"{}"
    request = AWSRequest(
        method="POST",
        url=server.url + "/",
        data=data,
        headers={k: v for k, v in headers.items() if k not in unsigned},
    )
    SigV4Auth(Credentials(*cred), "kms", REGION).add_auth(request)
    sent = {**dict(request.headers.items()), **{k: headers[k] for k in unsigned}}
    return requests.post(server.url + "/", data=data, headers=sent, timeout=30)


def test_the_aws_face_needs_target_and_content_type_signed(server: Server) -> None:
    native = Native(server)
    cred = native.credential("admin")
    assert _raw(server, cred, "TrentService.ListKeys", ()).status_code == 200
    for unsigned in (("X-Amz-Target",), ("Content-Type",)):
        r = _raw(server, cred, "TrentService.ListKeys", unsigned)
        assert r.status_code == 400 and r.json()["__type"] == "InvalidSignatureException"
    assert kms(server, cred).list_keys()["Keys"]  # boto3 signs both


def _xks(server: Server, cred: tuple[str, str], region: str) -> requests.Response:
    path = "/kms/xks/v1/keys/xks-e2e/metadata"
    body = {
        "requestMetadata": {
            "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
            "kmsOperation": "CreateKey",
            "kmsRequestId": str(uuid.uuid4()),
        }
    }
    data = json.dumps(body).encode()
    request = AWSRequest(
        "POST", server.url + path, data=data, headers={"Content-Type": "application/json"}
    )
    SigV4Auth(Credentials(*cred), "kms-xks-proxy", region).add_auth(request)
    return requests.post(server.url + path, data=data, headers=dict(request.headers), timeout=30)


def test_the_xks_face_refuses_another_region(server: Server) -> None:
    native = Native(server)
    native.principal("aws-xks-e2e")
    native.key("xks-e2e", "aws-xks-e2e", ["xks_encrypt", "xks_decrypt"])
    cred = native.credential("aws-xks-e2e")
    assert _xks(server, cred, REGION).status_code == 200
    r = _xks(server, cred, "eu-west-3")
    assert r.status_code == 401 and r.json()["errorName"] == "AuthenticationFailedException"
