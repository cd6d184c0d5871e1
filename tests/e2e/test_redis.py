"""Real gunicorn servers with KMS_REDIS_URL pointing at a real redis-server: rate limits
counted together by all workers, replays refused whichever worker or node gets them,
Redis stopped (signed requests refused, bearer requests still served under per-worker
limits) and started again (recovery without restarting the KMS); two nodes on one data
directory: a disabled key and a revoked credential stop on the other node."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from kms.client import KmsClient
from tests.helpers import Server, gunicorn_server
from tests.redis_server import RedisServer
from tests.sigv4_request import signed

pytestmark = pytest.mark.e2e


def parallel(n: int, call: Callable[[], requests.Response]) -> list[requests.Response]:
    """``n`` calls from 6 client threads at once."""
    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(lambda _: call(), range(n)))


def on_both_workers(
    server: Server, path: str, call: Callable[[], requests.Response]
) -> list[requests.Response]:
    """Batches of 12 parallel calls until both workers have answered a request to
    ``path`` (gunicorn may give a quick burst to one worker), at most 10 batches."""
    answers: list[requests.Response] = []
    for _ in range(10):
        answers += parallel(12, call)
        if len(request_pids(server, path)) == 2:
            return answers
    raise AssertionError(f"one worker answered all {len(answers)} requests")


def request_pids(server: Server, path: str) -> set[int]:
    """The worker pids that logged a request to ``path``."""
    pids = set()
    for line in server.log_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if (entry.get("msg"), entry.get("path")) == ("request", path):
                pids.add(entry["pid"])
    return pids


def service(admin: KmsClient, name: str, key: str) -> dict[str, str]:
    token = admin.create_principal(name, "service")["token"]
    admin.grant(key, name, ["datakey"])
    return {"Authorization": f"Bearer {token}"}


def datakey(server: Server, headers: dict[str, str], key: str = "k") -> requests.Response:
    body = {"context": {"a": "b"}}
    return requests.post(
        f"{server.url}/v1/keys/{key}/datakey", json=body, headers=headers, timeout=30
    )


def credential(server: Server, principal: str = "admin") -> tuple[str, str]:
    r = requests.post(
        f"{server.url}/v1/principals/{principal}/sigv4-credentials",
        headers={"Authorization": f"Bearer {server.admin_token}"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return r.json()["access_key_id"], r.json()["secret_access_key"]


def send(server: Server, request: tuple[dict[str, str], bytes]) -> requests.Response:
    headers, body = request
    return requests.post(server.url + "/", data=body, headers=headers, timeout=30)


def aws_type(response: requests.Response) -> str:
    return str(response.json().get("__type", "ok"))


def test_two_workers_share_limits_and_nonces_and_survive_a_redis_outage(
    fresh_data_dir: Path, own_redis: RedisServer
) -> None:
    env = {
        "KMS_REDIS_URL": own_redis.url,
        "KMS_RATE_LIMITS": "service=10/minute,principal:svc-down=4/minute",
    }
    with gunicorn_server(fresh_data_dir, workers=2, env=env) as server:
        admin = KmsClient(server.url, server.admin_token)
        admin.create_key("k")
        svc, down = service(admin, "svc", "k"), service(admin, "svc-down", "k")

        # 1. one count for both workers: 10 in total, not 10 per worker
        answers = on_both_workers(server, "/v1/keys/k/datakey", lambda: datakey(server, svc))
        codes = [r.status_code for r in answers]
        assert codes.count(200) == 10 and codes.count(429) == len(codes) - 10
        assert all(
            1 <= int(r.headers["Retry-After"]) <= 60 for r in answers if r.status_code == 429
        )

        # 2. the same signed request to both workers at once: accepted exactly once
        akid, secret = credential(server)
        request = signed(akid, secret, base_url=server.url)
        answers = on_both_workers(server, "/", lambda: send(server, request))
        types = [aws_type(r) for r in answers]
        assert types.count("ok") == 1
        assert types.count("ThrottlingException") == len(types) - 1

        # 3. Redis down: signed requests refused (fail closed), bearer requests served
        #    under each worker's own count (at most 4 per worker, never unlimited)
        own_redis.stop(keep_data=True)
        refused = send(server, signed(akid, secret, base_url=server.url))
        assert (refused.status_code, aws_type(refused)) == (500, "DependencyTimeoutException")
        codes = [r.status_code for r in parallel(20, lambda: datakey(server, down))]
        assert 4 <= codes.count(200) <= 8 and codes.count(429) == 20 - codes.count(200)
        metrics = requests.get(server.url + "/metrics", timeout=30).text
        assert 'kms_redis_errors_total{use="rate_limit"}' in metrics
        assert 'kms_redis_errors_total{use="nonce"}' in metrics

        # 4. Redis back (with its data): no KMS restart needed
        own_redis.start()
        time.sleep(1.2)  # kms.backends.redis_store.RETRY_SECONDS
        assert send(server, signed(akid, secret, base_url=server.url)).status_code == 200
        assert aws_type(send(server, request)) == "ThrottlingException"  # remembered
        assert datakey(server, svc).status_code == 429  # svc's 10 are still counted in Redis


def test_two_nodes_see_a_disabled_key_and_a_revoked_credential(
    fresh_data_dir: Path, redis_url: str
) -> None:
    env = {"KMS_REDIS_URL": redis_url, "KMS_AUTH_CACHE_SECONDS": "300"}
    with (
        gunicorn_server(fresh_data_dir, workers=1, env=env) as one,
        gunicorn_server(fresh_data_dir, workers=1, env=env) as two,
    ):
        admin_one = KmsClient(one.url, one.admin_token)
        admin_one.create_key("k")
        svc = service(admin_one, "svc", "k")
        assert datakey(two, svc).status_code == 200
        admin_one.key_action("k", "disable")
        refused = datakey(two, svc)  # key state is read for every request: at once
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "key_state"

        akid, secret = credential(one)
        request = signed(akid, secret, base_url=one.url)
        assert send(one, request).status_code == 200
        headers, body = request  # the same bytes, Host included, replayed to the other node
        replay = ({**headers, "Host": one.url.removeprefix("http://")}, body)
        assert aws_type(send(two, replay)) == "ThrottlingException"
        assert send(two, signed(akid, secret, base_url=two.url)).status_code == 200  # cached
        revoked = requests.delete(
            f"{one.url}/v1/principals/admin/sigv4-credentials/{akid}",
            headers={"Authorization": f"Bearer {one.admin_token}"},
            timeout=30,
        )
        assert revoked.status_code == 200
        time.sleep(1.1)  # kms.services.cluster.POLL_SECONDS, far below the 300 s cache
        stopped = send(two, signed(akid, secret, base_url=two.url))
        assert aws_type(stopped) == "UnrecognizedClientException"
