"""Issue 16, gap 4: a rewrap by a principal that may not decrypt the blob (a ``rewrap``
grant without ``decrypt``) tests a guessed encryption context: a right guess gives a new
blob, a wrong one a refusal. That bit cannot be hidden (a blob that does not authenticate
has nothing to re-encrypt), so it is bounded: each failure counts against the
principal's KMS_BLIND_REWRAP_FAILURES, and over it every blind rewrap of the principal is
refused (429) before any blob is opened, so the right guess gets exactly the answer of a
wrong one. Principals that may decrypt are not bounded (they would learn more from
decrypt). Real SoftHSM, real SQLite, a real Redis for the shared count."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest

from kms import config
from kms.app import create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.rate_limits import MemoryRateLimiter, RedisRateLimiter
from kms.backends.redis_store import RedisConnection
from kms.backends.storage import SqlStorage
from kms.services.model import Role
from kms.services.rate_limits import parse_blind_rewrap_failures
from tests.functional.test_aws_kms import Aws, credential
from tests.helpers import Api

RIGHT = {"patient": "p-17"}


def _wrong(i: int) -> dict[str, str]:
    return {"patient": f"p-{100 + i}"}


class World:
    def __init__(self, api: Api) -> None:
        self.api = api
        owner = api.principal("service", "owner")
        self.rotator = api.principal("service", "rotator")  # rewrap only
        self.keeper = api.principal("service", "keeper")  # decrypt and rewrap
        self.key_id = api.key("records", grant=owner, ops=("datakey", "decrypt"))
        for name, ops in (("rotator", ["rewrap"]), ("keeper", ["decrypt", "rewrap"])):
            body = {"principal": name, "operations": ops}
            r = api.call("POST", "/v1/keys/records/grants", api.admin, json=body)
            assert r.status_code == 200, r.json
        r = api.call("POST", "/v1/keys/records/datakey", owner, json={"context": RIGHT})
        assert r.status_code == 200, r.json
        self.blob = r.json["ciphertext"]

    def rewrap(self, who: dict[str, str], context: dict[str, str]) -> Any:
        body = {"ciphertext": self.blob, "context": context}
        return self.api.call("POST", "/v1/rewrap", who, json=body)


@pytest.fixture
def world(settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage) -> World:
    bounded = dataclasses.replace(
        settings, blind_rewrap_failures=parse_blind_rewrap_failures("service=3/hour")
    )
    app = create_app(bounded, hsm=hsm, storage=storage)
    return World(Api(app.test_client(), app.extensions["kms"].principals.bootstrap_admin("admin")))


def _error(r: Any) -> tuple[int, str, str]:
    return r.status_code, r.json["error"]["code"], r.json["error"]["message"]


def test_a_rewrap_only_principal_cannot_test_more_guesses_than_its_budget(world: World) -> None:
    assert world.rewrap(world.rotator, RIGHT).status_code == 200  # rewrapping still works
    for i in range(3):  # the budget: 3 failures an hour
        assert _error(world.rewrap(world.rotator, _wrong(i)))[:2] == (400, "decryption_failed")
    right, wrong = world.rewrap(world.rotator, RIGHT), world.rewrap(world.rotator, _wrong(9))
    assert _error(right) == _error(wrong)  # no oracle left: the right guess is not told
    assert right.status_code == 429 and right.json["error"]["code"] == "blind_rewraps_refused"
    assert int(right.headers["Retry-After"]) >= 1
    records = [r for r in world.api.audit() if r["principal"] == "rotator"]
    assert [r["outcome"] for r in records] == ["ok"] + ["decryption_failed"] * 3 + [
        "blind_rewraps_refused"
    ] * 2
    assert all("blind rewrap" in r["detail"] for r in records[1:4])


def test_a_principal_that_may_decrypt_is_not_bounded(world: World) -> None:
    for i in range(6):
        assert _error(world.rewrap(world.keeper, _wrong(i)))[:2] == (400, "decryption_failed")
    assert world.rewrap(world.keeper, RIGHT).status_code == 200
    # and the rotator's budget is its own
    assert world.rewrap(world.rotator, RIGHT).status_code == 200


def test_a_batch_counts_each_failed_item_in_turn(world: World) -> None:
    items = [{"ciphertext": world.blob, "context": _wrong(i)} for i in range(4)]
    items.append({"ciphertext": world.blob, "context": RIGHT})
    r = world.api.call("POST", "/v1/rewrap", world.rotator, json={"items": items})
    assert r.status_code == 200, r.json
    codes = [x["error"]["code"] for x in r.json["results"]]
    assert codes == ["decryption_failed"] * 3 + ["blind_rewraps_refused"] * 2


def test_the_aws_face_is_bounded_the_same_way(world: World) -> None:
    aws = Aws(world.api.client, *credential(world.api, "rotator"))

    def reencrypt(context: dict[str, str]) -> Any:
        return aws.call(
            "ReEncrypt",
            CiphertextBlob=world.blob,
            SourceEncryptionContext=context,
            DestinationKeyId=world.key_id,
            DestinationEncryptionContext=context,
        )

    assert reencrypt(RIGHT).status_code == 200
    for i in range(3):
        r = reencrypt(_wrong(i))
        assert json.loads(r.get_data())["__type"] == "InvalidCiphertextException"
    right, wrong = reencrypt(RIGHT), reencrypt(_wrong(9))
    bodies = [json.loads(x.get_data()) for x in (right, wrong)]
    assert bodies[0] == bodies[1] and bodies[0]["__type"] == "ThrottlingException"
    # moving the blob to another context needs decrypt: refused before anything is opened
    r = aws.call(
        "ReEncrypt",
        CiphertextBlob=world.blob,
        SourceEncryptionContext=RIGHT,
        DestinationKeyId=world.key_id,
    )
    assert json.loads(r.get_data())["__type"] == "AccessDeniedException"


def test_the_budget_setting(data_dir: Any) -> None:
    base = {"KMS_DATA_DIR": str(data_dir)}
    default = config.from_env(base).blind_rewrap_failures
    assert str(default.by_role[Role.SERVICE]) == "100/hour"
    env = {**base, "KMS_BLIND_REWRAP_FAILURES": "principal:rot=5/minute"}
    custom = config.from_env(env).blind_rewrap_failures
    assert str(custom.by_principal["rot"]) == "5/minute"
    for bad in ("service=lots", "nobody=1/hour"):
        with pytest.raises(config.ConfigError, match="KMS_BLIND_REWRAP_FAILURES"):
            config.from_env({**base, "KMS_BLIND_REWRAP_FAILURES": bad})


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_the_limiter_tells_the_wait_without_counting(
    backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "memory":
        limiter: Any = MemoryRateLimiter()
        other = limiter
    else:  # two processes sharing one Redis
        url = request.getfixturevalue("redis_url")
        limiter = RedisRateLimiter(RedisConnection(url, 250))
        other = RedisRateLimiter(RedisConnection(url, 250))
    assert other.wait("b", 2, 3600) == 0.0
    assert other.wait("b", 2, 3600) == 0.0  # asking counts nothing
    assert limiter.hit("b", 2, 3600) == 0.0 and limiter.hit("b", 2, 3600) == 0.0
    assert other.wait("b", 2, 3600) > 0
    assert other.wait("other", 2, 3600) == 0.0


def test_blobs_are_untouched(world: World) -> None:
    """A refused or failed blind rewrap changes nothing: the owner still opens the blob."""
    for i in range(5):
        world.rewrap(world.rotator, _wrong(i))
    owner = world.api.principal("service")
    body = {"principal": owner["X-Name"], "operations": ["decrypt"]}
    r = world.api.call("POST", "/v1/keys/records/grants", world.api.admin, json=body)
    assert r.status_code == 200, r.json
    r = world.api.call(
        "POST", "/v1/decrypt", owner, json={"ciphertext": world.blob, "context": RIGHT}
    )
    assert r.status_code == 200 and len(base64.b64decode(r.json["plaintext"])) == 32
