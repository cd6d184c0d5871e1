"""Issue 16, gap 1: a principal without a grant on a key learns nothing about it. Whether
the key exists, is unknown, or is named through an alias that does not exist, it gets
the same answer (status, error name and message), on every face and every operation
that names a key: native datakey, encrypt, decrypt and rewrap (single and batch items),
the AWS KMS face's Encrypt, GenerateDataKey(WithoutPlaintext), Decrypt, ReEncrypt and
DescribeKey, the XKS face's metadata, encrypt and decrypt. The audit record keeps the
precise reason; admins and principals holding a grant keep precise answers.

Real SoftHSM, real SQLite, AWS and XKS requests signed by botocore."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest

from tests.functional.test_aws_kms import Aws, credential
from tests.functional.test_xks import (  # noqa: F401 (fixtures)
    Xks,
    issue,
    meta,
    xapi,
    xapp,
    xks_settings,
)
from tests.helpers import Api, b64

GHOST_ALIAS = "ghost"  # no key has it


class World:
    """A service ``app`` with every native grant on key ``mine``; key ``theirs`` (alias
    ``theirs``), on which ``app`` holds no grant, used by service ``owner``; a key id and
    an alias that name no key; blobs of ``theirs`` and a copy naming the unknown key."""

    def __init__(self, api: Api, client: Any) -> None:
        self.api = api
        self.app = api.principal("service", "app")
        self.owner = api.principal("service", "owner")
        self.mine = api.key("mine", grant=self.app)
        self.theirs = api.key("theirs", grant=self.owner)
        self.unknown = str(uuid.uuid4())
        r = api.call("POST", "/v1/keys/theirs/datakey", self.owner, json={"context": {"p": "1"}})
        assert r.status_code == 200, r.json
        self.their_blob = base64.b64decode(r.json["ciphertext"])
        self.ghost_blob = self.their_blob.replace(self.theirs.encode(), self.unknown.encode())
        r = api.call("POST", "/v1/keys/mine/datakey", self.app, json={"context": {"p": "1"}})
        self.my_blob = base64.b64decode(r.json["ciphertext"])
        self.aws = Aws(client, *credential(api, "app"))
        self.aws_admin = Aws(client, *credential(api, "admin"))

    def refs(self) -> list[str]:
        """Every native way to name a key ``app`` may not use, existing or not."""
        return [self.theirs, "theirs", self.unknown, GHOST_ALIAS]

    def aws_refs(self) -> list[str]:
        arn = "arn:aws:kms:us-east-1:000000000000:"
        return [
            self.theirs,
            f"{arn}key/{self.theirs}",
            "alias/theirs",
            f"{arn}alias/theirs",
            self.unknown,
            f"{arn}key/{self.unknown}",
            f"alias/{GHOST_ALIAS}",
            f"{arn}alias/{GHOST_ALIAS}",
        ]


@pytest.fixture
def world(xapi: Api) -> World:  # noqa: F811
    return World(xapi, xapi.client)


def _native(r: Any) -> tuple[int, str, str]:
    body = r.json
    return r.status_code, body["error"]["code"], body["error"]["message"]


def _aws(r: Any) -> tuple[int, str, str]:
    body = json.loads(r.get_data())
    return r.status_code, body["__type"], body["message"]


def _item(result: dict[str, Any]) -> tuple[str, str]:
    """A batch item's error, without its request id (which differs per request)."""
    return result["error"]["code"], result["error"]["message"]


def _one(answers: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """The single answer every request got."""
    assert len(set(answers)) == 1, answers
    return answers[0]


def _details(api: Api, request_ids: list[str]) -> list[str]:
    by_id = {r["request_id"]: r for r in api.audit()}
    return [by_id[i]["detail"] for i in request_ids]


# -- native face --------------------------------------------------------------------------


def test_native_datakey_and_encrypt_say_the_same_for_every_key_without_a_grant(
    world: World,
) -> None:
    api = world.api
    for op, body in (("datakey", {}), ("encrypt", {"plaintext": b64(b"x")})):
        answers, ids = [], []
        for ref in world.refs():
            r = api.call("POST", f"/v1/keys/{ref}/{op}", world.app, json=body)
            answers.append(_native(r))
            ids.append(r.headers["X-Request-Id"])
        assert _one(answers) == (403, "forbidden", f"no {op} grant on this key")
        # the audit trail keeps what the caller is not told
        assert _details(api, ids) == [
            "no grant",
            "no grant",
            "no such key",
            "no key has this alias",
        ]
        batch = api.call(
            "POST", f"/v1/keys/{GHOST_ALIAS}/{op}", world.app, json={"items": [body, body]}
        )
        existing = api.call(
            "POST", f"/v1/keys/theirs/{op}", world.app, json={"items": [body, body]}
        )
        assert batch.status_code == existing.status_code == 200
        results = [_item(x) for r in (batch, existing) for x in r.json["results"]]
        assert _one(results) == ("forbidden", f"no {op} grant on this key")


def test_native_decrypt_of_a_blob_naming_an_unknown_key_is_refused_as_a_key_without_grant(
    world: World,
) -> None:
    api = world.api
    answers, ids = [], []
    for blob in (world.their_blob, world.ghost_blob):
        r = api.call(
            "POST", "/v1/decrypt", world.app, json={"ciphertext": b64(blob), "context": {"p": "1"}}
        )
        answers.append(_native(r))
        ids.append(r.headers["X-Request-Id"])
    assert _one(answers) == (403, "forbidden", "no decrypt grant on this key")
    assert _details(api, ids)[1] == "blob names an unknown key"
    items = [{"ciphertext": b64(world.their_blob)}, {"ciphertext": b64(world.ghost_blob)}]
    r = api.call("POST", "/v1/decrypt", world.app, json={"items": items})
    results = [_item(x) for x in r.json["results"]]
    assert _one(results) == ("forbidden", "no decrypt grant on this key")


def test_native_rewrap_says_the_same_for_sources_and_destinations_without_a_grant(
    world: World,
) -> None:
    api = world.api
    sources = [
        _native(api.call("POST", "/v1/rewrap", world.app, json={"ciphertext": b64(blob)}))
        for blob in (world.their_blob, world.ghost_blob)
    ]
    assert _one(sources) == (403, "forbidden", "no rewrap grant on this key")
    destinations = []
    for ref in world.refs():
        body = {"ciphertext": b64(world.my_blob), "context": {"p": "1"}, "destination_key": ref}
        destinations.append(_native(api.call("POST", "/v1/rewrap", world.app, json=body)))
    assert _one(destinations) == (403, "forbidden", "no rewrap grant on this key")


def test_a_grant_holder_and_an_admin_keep_precise_answers(world: World) -> None:
    api = world.api
    assert api.call("GET", f"/v1/keys/{GHOST_ALIAS}", api.admin).status_code == 404
    assert api.call("GET", f"/v1/keys/{world.unknown}", api.admin).status_code == 404
    assert api.call("POST", "/v1/keys/theirs/disable", api.admin).status_code == 200
    r = api.call("POST", "/v1/keys/theirs/datakey", world.owner, json={})
    assert r.status_code == 409 and r.json["error"]["code"] == "key_state"
    # a principal holding some grant on the key learns which permission it lacks
    assert api.call("POST", "/v1/keys/theirs/enable", api.admin).status_code == 200
    grant = {"principal": "app", "operations": ["encrypt"]}
    assert api.call("POST", "/v1/keys/theirs/grants", api.admin, json=grant).status_code == 200
    r = api.call("POST", "/v1/keys/theirs/datakey", world.app, json={})
    assert _native(r) == (403, "forbidden", "no datakey grant on this key")


# -- AWS KMS face ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "extra"),
    [
        ("Encrypt", {"Plaintext": b64(b"p")}),
        ("GenerateDataKey", {"KeySpec": "AES_256"}),
        ("GenerateDataKeyWithoutPlaintext", {"NumberOfBytes": 32}),
        ("DescribeKey", {}),
    ],
)
def test_aws_operations_naming_a_key_say_the_same_for_every_key_without_a_grant(
    world: World, operation: str, extra: dict[str, Any]
) -> None:
    answers, ids = [], []
    for ref in world.aws_refs():
        r = world.aws.call(operation, KeyId=ref, **extra)
        answers.append(_aws(r))
        ids.append(r.headers["x-amzn-RequestId"])
    status, name, _ = _one(answers)
    assert (status, name) == (400, "AccessDeniedException")
    details = _details(world.api, ids)
    assert details[0] == "no grant" and details[-1] in ("no key has this alias", "no such key")
    # the admin (who may read every key) is told precisely
    if operation == "DescribeKey":
        assert world.aws_admin.error(operation, KeyId=f"alias/{GHOST_ALIAS}") == (
            "NotFoundException"
        )
        assert world.aws_admin.ok(operation, KeyId="alias/theirs")["KeyMetadata"]


def test_aws_decrypt_and_reencrypt_say_the_same_for_every_key_without_a_grant(
    world: World,
) -> None:
    aws = world.aws
    blobs = (b64(world.their_blob), b64(world.ghost_blob))
    answers = [
        _aws(aws.call("Decrypt", CiphertextBlob=b, EncryptionContext={"p": "1"})) for b in blobs
    ]
    # a KeyId the caller adds changes nothing while it may not use the blob's key
    for ref in ("alias/theirs", "alias/mine", f"alias/{GHOST_ALIAS}", world.unknown):
        r = aws.call("Decrypt", CiphertextBlob=blobs[0], KeyId=ref, EncryptionContext={"p": "1"})
        answers.append(_aws(r))
    assert _one(answers) == (400, "AccessDeniedException", "no decrypt grant on this key")
    sources = []
    for blob in blobs:
        body = {"CiphertextBlob": blob, "DestinationKeyId": "alias/mine"}
        sources.append(_aws(aws.call("ReEncrypt", **body)))
    assert _one(sources) == (400, "AccessDeniedException", "no rewrap grant on this key")
    destinations = []
    for ref in world.aws_refs():
        r = aws.call(
            "ReEncrypt",
            CiphertextBlob=b64(world.my_blob),
            SourceEncryptionContext={"p": "1"},
            DestinationKeyId=ref,
            DestinationEncryptionContext={"p": "1"},
        )
        destinations.append(_aws(r))
    assert _one(destinations)[:2] == (400, "AccessDeniedException")


def test_aws_decrypt_with_a_key_id_tells_a_grant_holder_nothing_about_other_aliases(
    world: World,
) -> None:
    """The caller may decrypt the blob; the KeyId it names is compared with the blob's
    key: an alias of a key it may not use and an alias that does not exist both give
    IncorrectKeyException."""
    mine = b64(world.my_blob)
    for ref in ("alias/theirs", f"alias/{GHOST_ALIAS}", world.theirs, world.unknown):
        r = world.aws.call("Decrypt", CiphertextBlob=mine, KeyId=ref, EncryptionContext={"p": "1"})
        assert _aws(r)[:2] == (400, "IncorrectKeyException"), ref
    ok = world.aws.call(
        "Decrypt", CiphertextBlob=mine, KeyId="alias/mine", EncryptionContext={"p": "1"}
    )
    assert ok.status_code == 200


# -- XKS face -------------------------------------------------------------------------------


def test_xks_says_key_not_found_for_every_key_without_a_grant(xapi: Api) -> None:  # noqa: F811
    """AWS's XKS credential with grants on ``foo`` only: a key it holds no grant on and a
    key that does not exist both answer KeyNotFoundException (the spec's answer for an
    unknown key, which AWS's test client checks), with one message."""
    svc = xapi.principal("service", "aws-xks")
    xapi.key("foo", grant=svc, ops=("xks_encrypt", "xks_decrypt"))
    owner = xapi.principal("service", "owner")
    xapi.key("bar", grant=owner, ops=("xks_encrypt", "xks_decrypt"))
    xks = Xks(xapi.client, *issue(xapi, "aws-xks"))
    sealed = xks.encrypt("foo", b"p").json
    answers = []
    for key in ("bar", "ghost_key", str(uuid.uuid4())):
        answers.append(xks.post(f"keys/{key}/metadata", {"requestMetadata": meta("CreateKey")}))
        answers.append(xks.encrypt(key, b"p"))
        answers.append(xks.decrypt(key, sealed))
    bodies = {(r.status_code, r.get_data(as_text=True)) for r in answers}
    assert len(bodies) == 1, bodies
    ((status, text),) = bodies
    assert status == 404 and json.loads(text)["errorName"] == "KeyNotFoundException"
    records = [r for r in xapi.audit() if r["principal"] == "aws-xks" and r["outcome"] != "ok"]
    reasons = {r["detail"].rsplit(" | ", 1)[-1] for r in records}
    assert reasons == {"no grant", "no key has this alias", "no such key"}
    # a credential holding another grant on the key is told which one it lacks
    grant = {"principal": "aws-xks", "operations": ["xks_encrypt"]}
    assert xapi.call("POST", "/v1/keys/bar/grants", xapi.admin, json=grant).status_code == 200
    r = xks.decrypt("bar", sealed)
    assert r.status_code == 403 and r.json["errorName"] == "AccessDeniedException"
