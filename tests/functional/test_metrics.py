"""/metrics through the Flask test client (one process: the private registry) and /readyz
with each dependency named."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kms import config
from kms.app import create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from kms.errors import HsmUnavailable
from tests.helpers import Api, FailingPkcs11, b64

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(api: Api) -> tuple[str, Samples]:
    r = api.call("GET", "/metrics")
    assert r.status_code == 200 and r.content_type.startswith("text/plain")
    text = r.get_data(as_text=True)
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_counters_show_exactly_the_requests_made_with_their_outcomes(api: Api) -> None:
    svc = api.principal("service", "metrics-svc")
    stranger = api.principal("service", "metrics-stranger")
    key_id = api.key("metrics-key", grant=svc)
    audit_before = len(api.audit())
    _, before = scrape(api)

    enc = {"plaintext": b64(b"patient record")}
    for _ in range(3):
        assert api.call("POST", f"/v1/keys/{key_id}/encrypt", svc, json=enc).status_code == 200
    for _ in range(2):  # no grant
        r = api.call("POST", f"/v1/keys/{key_id}/encrypt", stranger, json=enc)
        assert r.status_code == 403 and r.json["error"]["code"] == "forbidden"
    bad_token = {"Authorization": "Bearer not-a-real-token-0123456789"}
    r = api.call("POST", f"/v1/keys/{key_id}/encrypt", bad_token, json=enc)
    assert r.status_code == 401
    r = api.call("POST", f"/v1/keys/{key_id}/encrypt", svc, json={"plaintext": "%%"})
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request"
    r = api.call("POST", "/v1/decrypt", svc, json={"ciphertext": b64(b"x" * 60)})
    assert r.status_code == 400 and r.json["error"]["code"] == "decryption_failed"
    assert api.call("GET", "/healthz").status_code == 200  # not an operation: not counted
    assert api.call("GET", "/nowhere").status_code == 404  # neither

    text, after = scrape(api)
    expected = {
        ("encrypt", "ok"): 3,
        ("encrypt", "forbidden"): 2,
        ("encrypt", "unauthenticated"): 1,
        ("encrypt", "invalid_request"): 1,
        ("decrypt", "decryption_failed"): 1,
    }
    changed = {
        (dict(labels)["operation"], dict(labels)["outcome"]): after[(name, labels)]
        - before.get((name, labels), 0.0)
        for name, labels in after
        if name == "kms_requests_total" and after[(name, labels)] != before.get((name, labels))
    }
    assert changed == expected
    assert delta(before, after, "kms_request_seconds_count", operation="encrypt") == 7
    assert delta(before, after, "kms_request_seconds_count", operation="decrypt") == 1
    assert delta(before, after, "kms_request_seconds_sum", operation="encrypt") > 0
    # one audit append per audited request (the failed authentication is not chained)
    assert delta(before, after, "kms_audit_append_seconds_count") == 7
    # a bad tag is the caller's data, not an HSM error
    assert not [k for k in after if k[0] == "kms_hsm_errors_total" and after[k] != before.get(k)]
    assert len(api.audit()) == audit_before + 7  # the scrapes wrote no audit record
    # labels are names and codes only: no key id, alias, principal or token
    for secret in (key_id, "metrics-key", "metrics-svc", "metrics-stranger", "not-a-real"):
        assert secret not in text
    assert svc["Authorization"].split()[1] not in text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names and all(n.startswith("kms_") for n in names)
    assert "metrics" not in {dict(labels).get("operation") for _, labels in after}


def test_hsm_errors_are_counted_by_kind(api: Api, hsm: Pkcs11Hsm) -> None:
    svc = api.principal("service", "svc")
    key_id = api.key("k", grant=svc)
    hsm.check()
    _, before = scrape(api)
    conn = hsm._conn  # the cached session breaks once; the backend reconnects and retries
    assert conn is not None
    conn.session = FailingPkcs11(conn.session)
    conn.root = FailingPkcs11(conn.root)
    conn.keks.clear()
    assert api.call("POST", f"/v1/keys/{key_id}/datakey", svc, json={}).status_code == 200
    _, after = scrape(api)
    assert delta(before, after, "kms_hsm_errors_total", kind="DeviceError") == 1
    assert delta(before, after, "kms_requests_total", operation="datakey", outcome="ok") == 1


class _Clock:
    def __init__(self) -> None:
        self.at = datetime(2030, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at


def test_rotation_due_gauge_is_computed_at_scrape_time(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage
) -> None:
    clock = _Clock()
    app = create_app(settings, hsm=hsm, storage=storage, clock=clock)
    token = app.extensions["kms"].principals.bootstrap_admin("admin")
    api = Api(app.test_client(), token)
    for alias in ("daily", "never"):
        api.key(alias)
    r = api.call("POST", "/v1/keys/daily/config", api.admin, json={"rotation_period_days": 1})
    assert r.status_code == 200, r.json
    assert value(scrape(api)[1], "kms_rotation_due_keys") == 0
    clock.at += timedelta(days=2)
    assert value(scrape(api)[1], "kms_rotation_due_keys") == 1
    assert api.call("POST", "/v1/keys/daily/rotate", api.admin).status_code == 200
    assert value(scrape(api)[1], "kms_rotation_due_keys") == 0


def test_metrics_answer_while_the_database_is_down(
    api: Api, db_path: Path, storage: SqlStorage
) -> None:
    """The gauge that needs the database reads NaN; the counters are still served."""
    api.key("k")
    moved = db_path.with_suffix(".moved")
    storage._engine.dispose()
    db_path.rename(moved)
    db_path.mkdir()
    try:
        _, samples = scrape(api)
    finally:
        db_path.rmdir()
        moved.rename(db_path)
    assert math.isnan(value(samples, "kms_rotation_due_keys"))
    assert value(samples, "kms_requests_total", operation="create_key", outcome="ok") >= 1


# -- /readyz ------------------------------------------------------------------------------


class _HsmWith:
    """The real backend, except the named methods raise HsmUnavailable (fault injection)."""

    def __init__(self, real: Pkcs11Hsm, *broken: str) -> None:
        self._real = real
        self._broken = broken

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name in self._broken:

            def fail(*_a: Any, **_k: Any) -> Any:
                raise HsmUnavailable(detail="injected")

            return fail
        return getattr(self._real, name)  # type: ignore[no-any-return]


def _readyz(settings: config.Settings, hsm: Any, storage: SqlStorage) -> tuple[int, Any]:
    app = create_app(settings, hsm=hsm, storage=storage)
    r = app.test_client().get("/readyz")
    return r.status_code, r.json


def test_readyz_names_every_dependency_when_all_are_up(api: Api) -> None:
    r = api.call("GET", "/readyz")
    assert r.status_code == 200
    assert r.json == {
        "status": "ok",
        "checks": {
            "hsm": "ok",
            "database": "ok",
            "audit_signing_key": "ok",
            "audit_anchor": "ok",
            "sealed_state": "ok",
        },
        "control": "single-operator",  # the tests' data directory: kms init --single-operator
    }


def test_readyz_is_503_and_names_the_hsm_when_it_is_down(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage
) -> None:
    status, body = _readyz(settings, _HsmWith(hsm, "check", "sign_digest"), storage)
    assert status == 503
    assert body == {
        "status": "unavailable",
        "checks": {
            "hsm": "hsm_unavailable",
            "database": "ok",
            "audit_signing_key": "hsm_unavailable",
            "audit_anchor": "ok",
            "sealed_state": "ok",
        },
        "control": "single-operator",
    }


def test_readyz_is_503_when_only_the_audit_signing_key_fails(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage
) -> None:
    status, body = _readyz(settings, _HsmWith(hsm, "sign_digest"), storage)
    assert status == 503
    assert body["checks"] == {
        "hsm": "ok",
        "database": "ok",
        "audit_signing_key": "hsm_unavailable",
        "audit_anchor": "ok",
        "sealed_state": "ok",
    }
    assert "injected" not in str(body)  # codes only, never the detail
