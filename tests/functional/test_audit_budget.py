"""Bounded audit growth (issue 15, item 7): rate limits count batch items, each principal
has a budget of chained audit records (KMS_AUDIT_BUDGET) whose refusals are coalesced,
and the chain's growth has metrics and an alert. Real SoftHSM token, real SQLite, real
Redis where the count is shared."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import pytest

from kms import config
from kms.app import create_app
from kms.metrics import AUDIT_BUDGET_REFUSED, AUDIT_GROWTH_ALERT
from kms.services.rate_limits import DEFAULT_AUDIT_BUDGET, Rate, parse_audit_budget
from kms.services.rate_limits import parse_rate_limits as limits
from tests.helpers import Api, b64
from tests.redis_server import RedisServer


class CountingHsm:
    """The real HSM, counting every call made through it but the state anchor reads
    (authentication follows the anchor: kms/services/principals.py)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += name != "anchor_values"
            return attr(*args, **kwargs)

        return counted


def make_app(settings: config.Settings, hsm: Any, storage: Any, **changes: Any) -> Any:
    return create_app(replace(settings, **changes), hsm=hsm, storage=storage)


def admin_api(app: Any) -> Api:
    token = app.extensions["kms"].principals.bootstrap_admin("admin")
    assert token is not None
    return Api(app.test_client(), token)


def blob(api: Api, owner: dict[str, str]) -> str:
    r = api.call("POST", "/v1/keys/k/datakey", owner, json={"context": {"a": "b"}})
    assert r.status_code == 200, r.json
    return str(r.json["ciphertext"])


def batch_decrypt(api: Api, who: dict[str, str], ciphertext: str, n: int) -> Any:
    items = [{"ciphertext": ciphertext, "context": {"a": "b"}}] * n
    return api.call("POST", "/v1/decrypt", who, json={"items": items})


def mine(api: Api, name: str) -> list[dict[str, Any]]:
    return [r for r in api.audit() if r["principal"] == name]


def test_attack_6_a_flood_of_refused_batches_stays_within_the_budget(
    settings: config.Settings, hsm: Any, storage: Any
) -> None:
    """A service principal without a grant sends 10 batches of 1,000 refused items: it
    chains at most its budget plus the coalesced refusal records, every answer past the
    budget is 429 (never 500) before any HSM call, and nothing else changes."""
    counting = CountingHsm(hsm)
    app = create_app(
        replace(
            settings,
            audit_budget=parse_audit_budget("service=2500/minute"),
            rate_limits=limits("service=none"),  # the budget alone (rates: the next test)
        ),
        hsm=counting,
        storage=storage,
    )
    api = admin_api(app)
    owner, attacker = api.principal("service", "owner"), api.principal("service", "attacker")
    key_id = api.key("k", grant=owner)
    ciphertext = blob(api, owner)
    seq_before = api.audit()[-1]["seq"]
    answers, hsm_calls = [], []
    for _ in range(10):
        before = counting.calls
        answers.append(batch_decrypt(api, attacker, ciphertext, 1000))
        hsm_calls.append(counting.calls - before)
    codes = [a.status_code for a in answers]
    assert codes == [200, 200] + [429] * 8  # the items of the first two are refused one by one
    assert all(r["error"]["code"] == "forbidden" for r in answers[0].json["results"])
    for refused, calls in zip(answers[2:], hsm_calls[2:], strict=True):
        assert refused.json["error"]["code"] == "audit_budget_exceeded"
        assert "2500/minute" in refused.json["error"]["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert calls == 0  # refused before any work
    chained = mine(api, "attacker")
    coalesced = [r for r in chained if r["outcome"] == "audit_budget_exceeded"]
    assert len(coalesced) == 1 and len(chained) == 2000 + 1 <= 2500 + 1
    assert coalesced[0]["request_id"] == answers[2].headers["X-Request-Id"]
    assert coalesced[0]["operation"] == "decrypt"
    assert "1 requests (1000 items) refused" in coalesced[0]["detail"]
    # the refusals held by this worker are chained in its next record, once the window
    # allows one: every refused request is counted exactly once
    budget = app.extensions["kms"].cluster.budget
    budget.flush()
    assert len(mine(api, "attacker")) == 2001  # still within the same window
    budget.coalesce_seconds = 1
    time.sleep(1.1)
    budget.flush()
    flushed = mine(api, "attacker")[-1]
    assert (flushed["operation"], flushed["outcome"]) == ("audit_budget", "audit_budget_exceeded")
    assert "7 requests (7000 items) refused" in flushed["detail"]
    # nothing else changed: the owner still decrypts, the key is as it was
    r = api.call(
        "POST", "/v1/decrypt", owner, json={"ciphertext": ciphertext, "context": {"a": "b"}}
    )
    assert r.status_code == 200 and r.json["key_id"] == key_id
    assert api.call("GET", f"/v1/keys/{key_id}", api.admin).json["state"] == "enabled"
    others = [r for r in api.audit() if r["seq"] > seq_before and r["principal"] != "attacker"]
    assert all(r["principal"] in ("owner", "admin") for r in others)


def test_a_batch_of_n_items_consumes_n_of_the_rate_limit(
    settings: config.Settings, hsm: Any, storage: Any, redis_url: str
) -> None:
    """Counted in a real Redis, shared by two nodes: a batch of 600 and one of 300 fill a
    limit of 1000 items a minute but for 100; a batch of 101 is then refused whole."""
    nodes = [
        make_app(
            settings,
            hsm,
            storage,
            rate_limits=limits("service=1000/minute"),
            audit_budget=parse_audit_budget("service=none"),
            redis_url=redis_url,
        )
        for _ in range(2)
    ]
    api = admin_api(nodes[0])
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    other = Api(nodes[1].test_client(), "unused")

    def datakeys(node: Api, n: int) -> Any:
        items = [{"context": {"i": str(i)}} for i in range(n)]
        return node.call("POST", "/v1/keys/k/datakey", svc, json={"items": items})

    assert datakeys(api, 600).status_code == 200
    assert datakeys(other, 300).status_code == 200
    refused = datakeys(api, 101)
    assert refused.status_code == 429 and refused.json["error"]["code"] == "rate_limited"
    assert "1000/minute" in refused.json["error"]["message"]
    # the refused request itself counted one (it was answered): 901, room for 99 more
    assert datakeys(other, 99).status_code == 200
    assert datakeys(api, 1).status_code == 429
    # the refused batch left one record (the request's refusal), not 101
    rid = refused.headers["X-Request-Id"]
    assert [r["outcome"] for r in api.audit() if r["request_id"] == rid] == ["rate_limited"]


def test_the_budget_is_shared_by_nodes_and_coalesced_once_per_window(
    settings: config.Settings, hsm: Any, storage: Any, own_redis: RedisServer
) -> None:
    budget = parse_audit_budget("service=4/minute")
    nodes = [
        make_app(settings, hsm, storage, audit_budget=budget, redis_url=own_redis.url)
        for _ in range(2)
    ]
    api = admin_api(nodes[0])
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    apis = [api, Api(nodes[1].test_client(), "unused")]
    body = {"context": {"a": "b"}}
    codes = [
        node.call("POST", "/v1/keys/k/datakey", svc, json=body).status_code
        for _ in range(5)
        for node in apis
    ]
    assert sorted(codes) == [200] * 4 + [429] * 6  # 4 records in all, not 4 per node
    assert own_redis.client().keys("kms:rate*audit*")  # counted in Redis
    chained = mine(api, "svc")
    assert [r["outcome"] for r in chained].count("ok") == 4
    assert [r["outcome"] for r in chained].count("audit_budget_exceeded") == 1  # not 2
    assert len(chained) == 5


def test_throttled_requests_are_charged_to_the_budget(
    settings: config.Settings, hsm: Any, storage: Any
) -> None:
    """A principal over its rate limit keeps knocking: each 429 is charged to its audit
    budget, so the rate_limited records stop at the budget and the rest are coalesced."""
    app = make_app(
        settings,
        hsm,
        storage,
        rate_limits=limits("auditor=2/minute"),
        audit_budget=parse_audit_budget("auditor=10/minute"),
    )
    api = admin_api(app)
    auditor = api.principal("auditor", "aud")
    codes = [api.call("GET", "/v1/keys", auditor).status_code for _ in range(50)]
    assert codes[:2] == [200, 200] and set(codes[2:]) == {429}
    outcomes = [r["outcome"] for r in mine(api, "aud") if r["operation"] == "list_keys"]
    # reads that succeed chain no record, yet are charged: 2 + 8 refusals fill the budget
    assert outcomes == ["rate_limited"] * 8 + ["audit_budget_exceeded"]


def test_the_aws_and_xks_faces_refuse_over_the_budget_in_their_own_format(
    settings: config.Settings, hsm: Any, storage: Any
) -> None:
    from tests.functional.test_aws_kms import Aws, credential, error_of
    from tests.functional.test_xks import PREFIX, Xks, error, issue

    app = make_app(
        settings,
        hsm,
        storage,
        xks_uri_prefix=PREFIX,
        audit_budget=parse_audit_budget("principal:aws-xks=2/minute,principal:boto=2/minute"),
    )
    api = admin_api(app)
    api.principal("service", "aws-xks")
    boto = api.principal("service", "boto")
    api.key("foo", grant=boto, ops=("encrypt",))
    grant = {"principal": "aws-xks", "operations": ["xks_encrypt"]}
    assert api.call("POST", "/v1/keys/foo/grants", api.admin, json=grant).status_code == 200
    xks = Xks(api.client, *issue(api, "aws-xks"))
    answers = [xks.encrypt("foo", b"p") for _ in range(4)]
    assert [a.status_code for a in answers[:2]] == [200, 200]
    for refused in answers[2:]:
        error(refused, 429, "ThrottlingException")
    aws = Aws(api.client, *credential(api, "boto"))
    calls = [aws.call("Encrypt", KeyId="alias/foo", Plaintext=b64(b"p")) for _ in range(4)]
    assert [c.status_code for c in calls[:2]] == [200, 200]
    assert [error_of(c) for c in calls[2:]] == ["ThrottlingException"] * 2  # AWS: 400
    for name, op in (("aws-xks", "xks_encrypt"), ("boto", "encrypt")):
        outcomes = [r["outcome"] for r in mine(api, name) if r["operation"] == op]
        assert outcomes == ["ok", "ok", "audit_budget_exceeded"]


def test_the_growth_metric_moves_and_the_alert_fires_past_the_threshold(
    settings: config.Settings, hsm: Any, storage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(settings, hsm, storage, audit_alert_records_per_minute=150)
    api = admin_api(app)
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    growth = app.extensions["kms"].audit_growth
    assert growth.sample() == 0
    refused_before = AUDIT_BUDGET_REFUSED.labels("service", "items")._value.get()

    def scrape() -> dict[str, float]:
        text = api.call("GET", "/metrics").get_data(as_text=True)
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("kms_audit_") and not line.startswith("kms_audit_append")
        }

    first = scrape()
    assert first["kms_audit_growth_alert"] == 0
    items = [{"context": {"i": str(i)}} for i in range(100)]
    assert api.call("POST", "/v1/keys/k/datakey", svc, json={"items": items}).status_code == 200
    second = scrape()
    assert second["kms_audit_chain_records"] >= first["kms_audit_chain_records"] + 100
    assert 100 <= second["kms_audit_records_last_minute"] <= 150
    assert second["kms_audit_growth_alert"] == 0
    with caplog.at_level(logging.ERROR, logger="kms.audit"):
        r = api.call("POST", "/v1/keys/k/datakey", svc, json={"items": items})
        assert r.status_code == 200
        third = scrape()
        scrape()  # the error line is written once, when the growth goes over
    assert third["kms_audit_records_last_minute"] > 150
    assert third["kms_audit_growth_alert"] == 1 and AUDIT_GROWTH_ALERT._value.get() == 1
    alerts = [r for r in caplog.records if "alert threshold" in r.getMessage()]
    assert len(alerts) == 1 and alerts[0].levelno == logging.ERROR
    assert AUDIT_BUDGET_REFUSED.labels("service", "items")._value.get() == refused_before
    growth.alert_per_minute = 0  # 0: never
    assert growth.sample() > 150 and AUDIT_GROWTH_ALERT._value.get() == 0


def test_the_budget_setting_is_checked_and_has_defaults() -> None:
    base = {"KMS_DATABASE_URL": "sqlite://", "KMS_HSM_PIN": "1"}
    loaded = config.from_env(base)
    assert loaded.audit_alert_records_per_minute == 60000
    assert loaded.audit_budget.by_role == parse_audit_budget("").by_role
    assert DEFAULT_AUDIT_BUDGET.count("=") == 5
    custom = config.from_env({**base, "KMS_AUDIT_BUDGET": "principal:bulk=5000000/hour"})
    assert custom.audit_budget.by_principal == {"bulk": Rate(5000000, 3600)}
    for bad in ("service=10", "root=1/second", "service=1/day"):
        with pytest.raises(config.ConfigError, match="KMS_AUDIT_BUDGET"):
            config.from_env({**base, "KMS_AUDIT_BUDGET": bad})
    with pytest.raises(config.ConfigError, match="KMS_AUDIT_ALERT_RECORDS_PER_MINUTE"):
        config.from_env({**base, "KMS_AUDIT_ALERT_RECORDS_PER_MINUTE": "-1"})
