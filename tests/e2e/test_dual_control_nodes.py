"""Dual control across two nodes (two gunicorn servers, two workers each, one PostgreSQL
database, one SoftHSM token), on a data directory made by the real ``kms init`` in dual
mode with its custodians pinned (``--custodian NAME:GROUP:B64KEY``): a change proposed on
one node is listed, approved and applied through the other; an approved change applied
by many concurrent requests split across both nodes takes effect exactly once (one 2xx,
every other answer 409), for principals, bearer tokens and SigV4 credentials."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms.backends.storage import schema as t
from kms.formats import change as changefmt
from kms.formats import escrow as escrowfmt
from tests.helpers import Server, gunicorn_server, run_kms

pytestmark = pytest.mark.e2e

ENV = {"KMS_SCHEDULER_SECONDS": "0"}
CUSTODIANS = (("officer", "keyholder"), ("dpo", "data_owner"), ("counsel", "legal"))
APPLIERS = 8  # concurrent applies of one change, half on each node
ROUNDS = ["create_principal"] * 3 + ["issue_token"] * 3 + ["issue_sigv4"] * 2 + ["create_principal"]


class Deployment:
    """The two nodes, the admin's token and the custodians' tokens and keys."""

    def __init__(self, data: Path, url: str, keys: dict[str, Ed25519PrivateKey]) -> None:
        self.data = data
        self.url = url
        self.keys = keys
        self.nodes: list[Server] = []
        self._n = 0

    def call(
        self, node: Server, method: str, path: str, who: str = "admin", body: Any = None
    ) -> requests.Response:
        name = "admin.token" if who == "admin" else f"custodian-{who}.token"
        token = (self.data / name).read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        return requests.request(method, node.url + path, json=body, headers=headers, timeout=60)

    def propose(self, node: Server, method: str, path: str, body: Any = None) -> dict[str, Any]:
        r = self.call(node, method, path, body=body)
        assert r.status_code == 202, r.text
        return dict(r.json()["change"])

    def approve(self, node: Server, change: dict[str, Any], who: str) -> dict[str, Any]:
        """``who`` signs the digest it recomputes from the change's fields, offline."""
        digest = changefmt.change_digest(change)
        signature = self.keys[who].sign(escrowfmt.signed_message(digest, "approve"))
        body = {"custodian": who, "signature": base64.b64encode(signature).decode()}
        r = self.call(node, "POST", f"/v1/changes/{change['change_id']}/approve", who, body)
        assert r.status_code == 200, r.text
        return dict(r.json()["change"])

    def approved(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """Proposed on node one, approved by officer on node one and dpo on node two."""
        one, two = self.nodes
        change = self.propose(one, method, path, body)
        self.approve(one, change, "officer")
        assert self.approve(two, change, "dpo")["approved"] is True
        return change

    def through(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        change = self.approved(method, path, body)
        r = self.call(self.nodes[1], "POST", f"/v1/changes/{change['change_id']}/apply", body={})
        assert r.status_code in (200, 201), r.text
        return dict(r.json())


def _init(data: Path, url: str) -> dict[str, Ed25519PrivateKey]:
    """``kms init`` in dual mode (no --single-operator) with three custodians pinned; the
    control policy requires the keyholder's and the data owner's groups."""
    keys = {name: Ed25519PrivateKey.generate() for name, _ in CUSTODIANS}
    pins = []
    for name, group in CUSTODIANS:
        raw = (
            keys[name]
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        pins += ["--custodian", f"{name}:{group}:{base64.b64encode(raw).decode()}"]
    done = run_kms(
        "init",
        "--data-dir",
        str(data),
        "--database-url",
        url,
        *pins,
        env={"KMS_CHANGE_REQUIRED_GROUPS": "keyholder,data_owner"},
    )
    assert done.returncode == 0, done.stderr
    assert "control policy: mode=dual quorum=2 groups=data_owner,keyholder" in done.stdout
    return keys


def _credentials(url: str) -> int:
    """SigV4 credential rows in the database (no endpoint lists them)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return int(
                c.execute(sa.select(sa.func.count()).select_from(t.sigv4_credentials)).scalar_one()
            )
    finally:
        engine.dispose()


def _apply_at_once(deployment: Deployment, change_id: str) -> list[requests.Response]:
    """APPLIERS applies of one change, released together, alternating between nodes."""
    start = threading.Barrier(APPLIERS)

    def one(i: int) -> requests.Response:
        node = deployment.nodes[i % 2]
        start.wait(timeout=30)
        return deployment.call(node, "POST", f"/v1/changes/{change_id}/apply", body={})

    with ThreadPoolExecutor(APPLIERS) as pool:
        return list(pool.map(one, range(APPLIERS)))


def test_concurrent_applies_on_two_nodes_take_effect_once(tmp_path: Path, pg_database: Any) -> None:
    data = tmp_path / "data"
    keys = _init(data, pg_database.url)
    deployment = Deployment(data, pg_database.url, keys)
    with (
        gunicorn_server(data, workers=2, env=ENV) as one,
        gunicorn_server(data, workers=2, env=ENV) as two,
    ):
        deployment.nodes = [one, two]
        for node in (one, two):
            assert requests.get(node.url + "/readyz", timeout=10).json()["control"] == "dual"
        deployment.through("POST", "/v1/principals", {"name": "svc-0", "role": "service"})
        applied: dict[str, int] = {}
        for n, kind in enumerate(ROUNDS, start=1):
            tokens = len(
                deployment.call(one, "GET", "/v1/principals/svc-0/tokens").json()["tokens"]
            )
            credentials = _credentials(pg_database.url)
            if kind == "create_principal":
                change = deployment.approved(
                    "POST", "/v1/principals", {"name": f"svc-{n}", "role": "service"}
                )
            elif kind == "issue_token":
                change = deployment.approved("POST", "/v1/principals/svc-0/tokens", {})
            else:
                change = deployment.approved("POST", "/v1/principals/svc-0/sigv4-credentials", {})
            answers = _apply_at_once(deployment, change["change_id"])
            statuses = sorted(r.status_code for r in answers)
            won = [s for s in statuses if s in (200, 201)]
            assert len(won) == 1 and statuses.count(409) == APPLIERS - 1, (kind, statuses)
            for r in answers:
                if r.status_code == 409:
                    assert r.json()["error"]["code"] == "conflict", r.text
            winner = next(r.json() for r in answers if r.status_code in (200, 201))
            listed = deployment.call(one, "GET", "/v1/principals/svc-0/tokens").json()["tokens"]
            if kind == "create_principal":
                assert winner["name"] == f"svc-{n}" and winner["token"]
                names = [
                    p["name"]
                    for p in deployment.call(two, "GET", "/v1/principals").json()["principals"]
                ]
                assert names.count(f"svc-{n}") == 1
            elif kind == "issue_token":
                assert winner["token"] and len(listed) == tokens + 1
            else:
                assert winner["secret_access_key"]
                after = _credentials(pg_database.url)
                assert after == credentials + 1
            for node in (one, two):
                state = deployment.call(node, "GET", f"/v1/changes/{change['change_id']}").json()
                assert state["change"]["state"] == "applied"
            applied[change["change_id"]] = 0

        # one apply_change record per change in the one audit trail, each by the admin
        records = deployment.call(one, "GET", "/v1/audit?after=0&limit=1000").json()["records"]
        for record in records:
            if record["operation"] == "apply_change" and record["outcome"] == "ok":
                for change_id in applied:
                    if f"change={change_id} " in (record["detail"] or ""):
                        applied[change_id] += 1
                        assert record["principal"] == "admin"
        assert set(applied.values()) == {1}, applied
        # some applies passed the first check together and met in the effect's own
        # transaction, where the locked change row let one through (each refusal recorded)
        late = [
            r for r in records if r["outcome"] == "conflict" and r["operation"] != "apply_change"
        ]
        assert late, "no two applies ever raced: the test did not exercise the lock"


def test_a_proposal_on_one_node_is_listed_approved_and_applied_on_the_other(
    tmp_path: Path, pg_database: Any
) -> None:
    data = tmp_path / "data"
    keys = _init(data, pg_database.url)
    deployment = Deployment(data, pg_database.url, keys)
    with (
        gunicorn_server(data, workers=2, env=ENV) as one,
        gunicorn_server(data, workers=2, env=ENV) as two,
    ):
        deployment.nodes = [one, two]
        # the admin alone on either node makes nothing
        for node in (one, two):
            r = deployment.call(node, "POST", "/v1/principals", body={"name": "x", "role": "admin"})
            assert r.status_code == 202
        change = deployment.propose(
            two, "POST", "/v1/principals", {"name": "app", "role": "service"}
        )
        cid = change["change_id"]
        for node, who in ((one, "admin"), (one, "counsel"), (two, "dpo")):
            pending = deployment.call(node, "GET", "/v1/changes?state=pending", who).json()
            assert cid in [c["change_id"] for c in pending["changes"]]
        early = deployment.call(one, "POST", f"/v1/changes/{cid}/apply", body={})
        assert early.status_code == 403  # not approved yet
        deployment.approve(one, change, "officer")
        deployment.approve(two, change, "dpo")
        view = deployment.call(one, "GET", f"/v1/changes/{cid}").json()["change"]
        assert view["approved"] is True and view["approvals"] == ["dpo", "officer"]
        r = deployment.call(one, "POST", f"/v1/changes/{cid}/apply", body={})
        assert r.status_code == 201, r.text
        app = {"Authorization": f"Bearer {r.json()['token']}"}
        assert requests.get(two.url + "/v1/principals", headers=app, timeout=30).status_code == 403
        again = deployment.call(two, "POST", f"/v1/changes/{cid}/apply", body={})
        assert again.status_code == 409
        names = [
            p["name"] for p in deployment.call(two, "GET", "/v1/principals").json()["principals"]
        ]
        assert names.count("app") == 1 and "x" not in names
