"""Per-principal rate limits: the policy (KMS_RATE_LIMITS), the 429 answer with
Retry-After and its audit record, counting shared by two app instances ("nodes") through
a real Redis, and what happens when that Redis stops and comes back."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import pytest
import redis

from kms import config
from kms.app import create_app
from kms.backends.redis_store import RETRY_SECONDS
from kms.logs import JsonFormatter
from kms.services.model import Principal, Role
from kms.services.rate_limits import DEFAULT_RATE_LIMITS, Rate, parse_rate_limits
from tests.helpers import Api
from tests.redis_server import RedisServer


def make_app(settings: config.Settings, hsm: Any, storage: Any, limits: str, **more: Any) -> Any:
    changed = replace(settings, rate_limits=parse_rate_limits(limits), **more)
    return create_app(changed, hsm=hsm, storage=storage)


def admin_api(app: Any) -> Api:
    token = app.extensions["kms"].principals.bootstrap_admin("admin")
    assert token is not None
    return Api(app.test_client(), token)


def datakey(api: Api, who: dict[str, str]) -> Any:
    return api.call("POST", "/v1/keys/k/datakey", who, json={"context": {"a": "b"}})


def statuses(api: Api, who: dict[str, str], n: int) -> list[int]:
    return [datakey(api, who).status_code for _ in range(n)]


def test_over_the_rate_is_429_with_retry_after_and_audited(
    settings: config.Settings, hsm: Any, storage: Any
) -> None:
    app = make_app(settings, hsm, storage, "service=3/minute")
    api = admin_api(app)
    svc, other = api.principal("service", "svc"), api.principal("service", "other")
    api.key("k", grant=svc)
    grant = {"principal": "other", "operations": ["datakey"]}
    assert api.call("POST", "/v1/keys/k/grants", api.admin, json=grant).status_code == 200
    assert statuses(api, svc, 3) == [200, 200, 200]
    refused = datakey(api, svc)
    assert refused.status_code == 429
    assert refused.json["error"]["code"] == "rate_limited"
    assert "3/minute" in refused.json["error"]["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert statuses(api, other, 4) == [200, 200, 200, 429]  # each principal has its own
    record = [r for r in api.audit() if r["principal"] == "svc"][-1]
    assert (record["operation"], record["outcome"]) == ("datakey", "rate_limited")
    assert "Retry-After" not in api.call("GET", "/v1/keys", api.admin).headers


def test_a_principal_entry_wins_over_its_role(
    settings: config.Settings, hsm: Any, storage: Any
) -> None:
    limits = "service=2/minute,principal:bulk=4/minute,principal:free=none"
    app = make_app(settings, hsm, storage, limits)
    api = admin_api(app)
    who = {name: api.principal("service", name) for name in ("plain", "bulk", "free")}
    api.key("k", grant=who["plain"])
    for name in ("bulk", "free"):
        grant = {"principal": name, "operations": ["datakey"]}
        assert api.call("POST", "/v1/keys/k/grants", api.admin, json=grant).status_code == 200
    assert statuses(api, who["plain"], 3) == [200, 200, 429]
    assert statuses(api, who["bulk"], 5) == [200] * 4 + [429]
    assert statuses(api, who["free"], 8) == [200] * 8


def test_roles_other_than_service_are_limited_too(
    settings: config.Settings, hsm: Any, storage: Any
) -> None:
    app = make_app(settings, hsm, storage, "admin=2/minute")
    api = admin_api(app)
    codes = [api.call("GET", "/v1/keys", api.admin).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_the_default_policy_and_overrides() -> None:
    default = parse_rate_limits("")
    admin = Principal(1, "a", Role.ADMIN, None)  # type: ignore[arg-type]
    svc = Principal(2, "s", Role.SERVICE, None)  # type: ignore[arg-type]
    assert default.rate_for(svc) == Rate(20000, 1) and default.rate_for(admin) == Rate(1000, 1)
    assert all(role in default.by_role for role in Role)  # every role has a default
    custom = parse_rate_limits(" admin = 5/hour , principal:s=none ")
    assert custom.rate_for(admin) == Rate(5, 3600) and str(custom.rate_for(admin)) == "5/hour"
    assert custom.rate_for(svc) is None
    assert parse_rate_limits("", base="").by_role == {}
    assert DEFAULT_RATE_LIMITS.count("=") == len(Role)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("service=10", "N/second"),
        ("service=0/second", "N/second"),
        ("service=1.5/second", "N/second"),
        ("service=10/day", "N/second"),
        ("root=10/second", "unknown role"),
        ("service", "expected ROLE=N/UNIT"),
        ("principal:=1/second", "expected ROLE=N/UNIT"),
        ("service=1/second,service=2/second", "given twice"),
        ("principal:x=1/second;admin=1/second", "N/second"),
    ],
)
def test_bad_rate_limits_are_refused_at_start(value: str, says: str) -> None:
    env = {"KMS_DATABASE_URL": "sqlite://", "KMS_HSM_PIN": "1", "KMS_RATE_LIMITS": value}
    with pytest.raises(config.ConfigError) as e:
        config.from_env(env)
    assert "KMS_RATE_LIMITS" in str(e.value) and says in str(e.value)


def test_redis_settings_are_checked_and_the_url_never_printed() -> None:
    base = {"KMS_DATABASE_URL": "sqlite://", "KMS_HSM_PIN": "1"}
    with pytest.raises(config.ConfigError, match="KMS_REDIS_URL"):
        config.from_env({**base, "KMS_REDIS_URL": "http://127.0.0.1:6379"})
    with pytest.raises(config.ConfigError, match="KMS_REDIS_TIMEOUT_MS"):
        config.from_env({**base, "KMS_REDIS_URL": "redis://x", "KMS_REDIS_TIMEOUT_MS": "0"})
    secret_url = "redis://:s3cret-pass@127.0.0.1:6379/2"
    loaded = config.from_env({**base, "KMS_REDIS_URL": secret_url})
    assert loaded.redis_url == secret_url and "s3cret-pass" not in repr(loaded)
    assert config.from_env(base).redis_url is None


def test_two_nodes_share_one_count_in_redis(
    settings: config.Settings, hsm: Any, storage: Any, redis_url: str, redis_server: RedisServer
) -> None:
    one = make_app(settings, hsm, storage, "service=4/minute", redis_url=redis_url)
    api = admin_api(one)
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    node = make_app(settings, hsm, storage, "service=4/minute", redis_url=redis_url)
    two = Api(node.test_client(), "unused")
    codes = [datakey(node, svc).status_code for _ in range(4) for node in (api, two)]
    assert sorted(codes) == [200] * 4 + [429] * 4  # 4 in total, not 4 per node
    assert redis_server.client().keys("kms:rate*")  # counted in Redis


def test_redis_down_counts_per_process_then_shares_again(
    settings: config.Settings, hsm: Any, storage: Any, own_redis: RedisServer
) -> None:
    nodes = [
        make_app(settings, hsm, storage, "service=3/minute", redis_url=own_redis.url)
        for _ in range(2)
    ]
    api = admin_api(nodes[0])
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    apis = [api, Api(nodes[1].test_client(), "unused")]
    errors = _redis_errors("rate_limit")
    own_redis.stop()
    # each node enforces the whole limit on its own: bounded, never unlimited
    assert statuses(apis[0], svc, 4) == [200, 200, 200, 429]
    assert statuses(apis[1], svc, 4) == [200, 200, 200, 429]
    assert _redis_errors("rate_limit") > errors
    own_redis.start()  # empty, as after a crash without persistence
    time.sleep(RETRY_SECONDS + 0.1)
    codes = [datakey(node, svc).status_code for _ in range(3) for node in apis]
    assert sorted(codes) == [200] * 3 + [429] * 3  # shared in Redis again, no restart


def _redis_errors(use: str) -> float:
    from kms.metrics import REDIS_ERRORS

    return float(REDIS_ERRORS.labels(use)._value.get())


class Lines(logging.Handler):
    """The kms log lines as written (JSON), for a test to read."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(JsonFormatter().format(record))


def test_a_redis_password_works_and_never_shows(
    settings: config.Settings, hsm: Any, storage: Any, own_redis: RedisServer
) -> None:
    own_redis.client().config_set("requirepass", "s3cret-pass")
    base = f"127.0.0.1:{own_redis.port}/0"
    good, bad = f"redis://:s3cret-pass@{base}", f"redis://:wrong-pass@{base}"
    handler = Lines()
    logging.getLogger("kms").addHandler(handler)
    try:
        app = make_app(settings, hsm, storage, "service=2/minute", redis_url=good)
        api = admin_api(app)
        svc = api.principal("service", "svc")
        api.key("k", grant=svc)
        assert statuses(api, svc, 3) == [200, 200, 429]
        authed = redis.Redis(host="127.0.0.1", port=own_redis.port, password="s3cret-pass")
        assert authed.keys("kms:rate*")  # counted in Redis, so the password was used
        wrong = make_app(settings, hsm, storage, "service=2/minute", redis_url=bad)
        # refused by Redis: counted in this process instead, and the refusal is logged
        assert statuses(Api(wrong.test_client(), "unused"), svc, 3) == [200, 200, 429]
    finally:
        logging.getLogger("kms").removeHandler(handler)
    text = "\n".join(handler.lines)
    assert '"msg": "redis unavailable"' in text and '"error": "AuthenticationError"' in text
    assert "s3cret-pass" not in text and "wrong-pass" not in text
    assert "s3cret-pass" not in repr(app.extensions["kms"])


def test_a_throttled_xks_request_is_audited_once(
    settings: config.Settings, hsm: Any, storage: Any
) -> None:
    """The SigV4 faces count a request after its signature verified, inside the audited
    scope: the 429 of an authenticated caller leaves one record, as on the native face."""
    from tests.functional.test_xks import PREFIX, Xks, issue

    app = make_app(settings, hsm, storage, "service=2/minute", xks_uri_prefix=PREFIX)
    api = admin_api(app)
    api.principal("service", "aws-xks")
    api.key("foo")
    grant = {"principal": "aws-xks", "operations": ["xks_encrypt"]}
    assert api.call("POST", "/v1/keys/foo/grants", api.admin, json=grant).status_code == 200
    xks = Xks(api.client, *issue(api, "aws-xks"))
    answers = [xks.encrypt("foo", b"p") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json["errorName"] == "ThrottlingException"
    rid = answers[2].headers["X-Request-Id"]
    records = [r for r in api.audit() if r["request_id"] == rid]
    assert [(r["operation"], r["outcome"], r["principal"]) for r in records] == [
        ("xks_encrypt", "rate_limited", "aws-xks")
    ]
