"""SigV4 replay protection and credential revocation with a real Redis shared by two app
instances ("nodes"): replays refused across nodes, fail closed while Redis is down or
after it came back empty, recovery without restarting the KMS."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from kms import config
from kms.app import create_app
from kms.backends.redis_store import NONCE_WARM_UP, RETRY_SECONDS
from kms.errors import StorageUnavailable
from kms.services.sigv4 import SignedRequest
from tests.helpers import Api, ManualClock
from tests.redis_server import RedisServer
from tests.sigv4_request import signed


class Node:
    """One app instance: its admin API (bearer) and signed AWS KMS calls."""

    def __init__(self, app: Any, admin_token: str) -> None:
        self.app = app
        self.api = Api(app.test_client(), admin_token)

    def send(self, request: tuple[dict[str, str], bytes]) -> Any:
        headers, body = request
        return self.api.client.post("/", data=body, headers=headers)


def nodes(
    settings: config.Settings, hsm: Any, storage: Any, n: int, clock: Any = None, **more: Any
) -> list[Node]:
    apps = [
        create_app(replace(settings, **more), hsm=hsm, storage=storage, clock=clock)
        for _ in range(n)
    ]
    token = apps[0].extensions["kms"].principals.bootstrap_admin("admin")
    assert token is not None
    return [Node(app, token) for app in apps]


def credential(node: Node) -> tuple[str, str]:
    r = node.api.call("POST", "/v1/principals/admin/sigv4-credentials", node.api.admin)
    assert r.status_code == 201, r.json
    return r.json["access_key_id"], r.json["secret_access_key"]


def aws_type(response: Any) -> str:
    return str(json.loads(response.data)["__type"])


def nonce_rows(db_path: Path) -> int:
    with sqlite3.connect(db_path) as db:
        return int(db.execute("SELECT count(*) FROM sigv4_nonces").fetchone()[0])


def test_a_replay_is_refused_by_another_node_and_nonces_live_in_redis(
    settings: config.Settings,
    hsm: Any,
    storage: Any,
    db_path: Path,
    redis_url: str,
    redis_server: RedisServer,
) -> None:
    one, two = nodes(settings, hsm, storage, 2, redis_url=redis_url)
    akid, secret = credential(one)
    request = signed(akid, secret)
    assert one.send(request).status_code == 200
    replayed = two.send(request)
    assert replayed.status_code == 400 and aws_type(replayed) == "ThrottlingException"
    assert "already received" in json.loads(replayed.data)["message"]
    assert two.send(signed(akid, secret)).status_code == 200  # a fresh signature is fine
    assert nonce_rows(db_path) == 0  # Redis is the store, not the database
    keys = redis_server.client().keys("kms:sigv4-nonce:*")
    assert len(keys) == 2
    assert all(0 < redis_server.client().ttl(k) <= 301 + 300 for k in keys)


def test_without_redis_the_database_table_is_the_store(
    settings: config.Settings, hsm: Any, storage: Any, db_path: Path
) -> None:
    one, two = nodes(settings, hsm, storage, 2)
    akid, secret = credential(one)
    request = signed(akid, secret)
    assert one.send(request).status_code == 200
    assert aws_type(two.send(request)) == "ThrottlingException"
    assert nonce_rows(db_path) == 1


def test_signed_requests_fail_closed_while_redis_is_down_then_recover(
    settings: config.Settings, hsm: Any, storage: Any, own_redis: RedisServer
) -> None:
    (node,) = nodes(settings, hsm, storage, 1, redis_url=own_redis.url)
    akid, secret = credential(node)
    before = signed(akid, secret)
    assert node.send(before).status_code == 200
    own_redis.stop(keep_data=True)
    refused = node.send(signed(akid, secret))
    assert aws_type(refused) == "DependencyTimeoutException"  # the AWS face's 5xx for it
    with pytest.raises(StorageUnavailable) as e:
        node.app.extensions["kms"].sigv4.verify(_signed_request(akid, secret), "kms")
    assert e.value.status == 503
    assert node.api.call("GET", "/v1/keys", node.api.admin).status_code == 200  # bearer: served
    own_redis.start()  # with its data, as a Redis with persistence restarts
    time.sleep(RETRY_SECONDS + 0.1)
    assert node.send(signed(akid, secret)).status_code == 200  # no KMS restart needed
    assert aws_type(node.send(before)) == "ThrottlingException"  # still remembered


def test_a_redis_back_empty_refuses_until_the_replay_window_has_passed(
    settings: config.Settings, hsm: Any, storage: Any, own_redis: RedisServer
) -> None:
    clock = ManualClock()
    (node,) = nodes(settings, hsm, storage, 1, clock=clock, redis_url=own_redis.url)
    akid, secret = credential(node)

    def now_signed() -> tuple[dict[str, str], bytes]:
        return signed(akid, secret, when=clock.now().replace(tzinfo=None))

    captured = now_signed()
    assert node.send(captured).status_code == 200
    own_redis.stop()  # its nonces are lost
    own_redis.start()
    time.sleep(RETRY_SECONDS + 0.1)
    clock.advance(60)  # the captured request is still within the 5-minute skew
    assert aws_type(node.send(captured)) == "DependencyTimeoutException"  # not accepted
    assert aws_type(node.send(now_signed())) == "DependencyTimeoutException"
    clock.advance(NONCE_WARM_UP - 30)
    assert aws_type(node.send(now_signed())) == "DependencyTimeoutException"
    clock.advance(31)  # the replay window of everything Redis forgot has passed
    assert node.send(now_signed()).status_code == 200
    assert aws_type(node.send(captured)) == "InvalidSignatureException"  # expired now


@pytest.mark.parametrize("with_redis", [True, False])
def test_a_revoked_credential_stops_on_other_nodes_at_once(
    settings: config.Settings,
    hsm: Any,
    storage: Any,
    redis_server: RedisServer,
    with_redis: bool,
) -> None:
    redis_url = redis_server.url if with_redis else None
    if with_redis:
        redis_server.flush()
    one, two = nodes(settings, hsm, storage, 2, redis_url=redis_url, auth_cache_seconds=300)
    akid, secret = credential(one)
    assert two.send(signed(akid, secret)).status_code == 200  # node two caches it
    revoked = one.api.call(
        "DELETE", f"/v1/principals/admin/sigv4-credentials/{akid}", one.api.admin
    )
    assert revoked.status_code == 200
    assert aws_type(one.send(signed(akid, secret))) == "UnrecognizedClientException"
    # with or without Redis: the revocation moved the HSM state anchor, which the other
    # node's credential cache follows (kms/services/state_index.py cache_version)
    assert aws_type(two.send(signed(akid, secret))) == "UnrecognizedClientException"


def _signed_request(akid: str, secret: str) -> SignedRequest:
    headers, body = signed(akid, secret)
    lowered = {k.lower(): v for k, v in headers.items()}
    lowered["host"] = "localhost"
    return SignedRequest("POST", "/", "", lowered, body)


def test_nonce_retention_matches_the_skew() -> None:
    from kms.services.sigv4 import MAX_SKEW

    assert timedelta(seconds=NONCE_WARM_UP) == MAX_SKEW + timedelta(seconds=1)
