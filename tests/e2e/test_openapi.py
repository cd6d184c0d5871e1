"""The OpenAPI 3.1 document of the native API (kms/api/openapi.json) against the code and a
running server.

The cheap tests check that the document is valid OpenAPI 3.1 and names exactly the routes the
Flask app serves. The property-based run (schemathesis) starts a real gunicorn with a real
SoftHSM token, checks that it serves the packaged document at ``/v1/openapi.json``, and
sends every operation generated requests, valid and invalid, with the token of a role the
operation admits: no answer may be a 5xx or contradict the document (status, content type,
headers, body schema), documented constraints must be enforced (schema-violating requests
get a 4xx), and no operation may answer without credentials. The server runs under dual
control, as ``kms init`` deploys it (see ``world``). Known names (keys with a grant, a blob,
cases, custodians, changes) are swapped into half of the valid requests so that operations
also succeed, not only fail. The run is deterministic: fixed seed, derandomized Hypothesis,
no example database.

The document is loaded from the package at import (schemathesis's pytest integration makes
one test per operation from a schema it has at collection time; its fixture-based loader
does not run under pytest 9.2).
"""

from __future__ import annotations

import base64
import json
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import requests
import schemathesis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Flask
from hypothesis import HealthCheck, settings

from kms.formats import change as changefmt
from kms.formats import escrow as escrowfmt
from tests.helpers import SECRET, Receiver, Server, gunicorn_server, run_kms

DOCUMENT: dict[str, Any] = json.loads(files("kms.api").joinpath("openapi.json").read_bytes())

# Paths of the native API; the AWS KMS face (POST /), the XKS face (/kms/xks/v1) and the
# dashboard (/dashboard) have their own specifications.
NATIVE = re.compile(r"^/v1/|^/(healthz|readyz|metrics)$")


# -- the document itself ---------------------------------------------------------------------


def _schemas(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every Schema Object of the document (values of a "schema" key or components)."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}/{key}"
            if key == "schema" or path == "/components/schemas":
                yield where, value
            else:
                yield from _schemas(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _schemas(value, f"{path}/{i}")


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def test_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(DOCUMENT).validate()  # the OpenAPI 3.1 meta-schema
    for where, schema in _schemas(DOCUMENT):
        assert jsonschema_rs.meta.is_valid(schema), where  # JSON Schema 2020-12
    for ref in set(_refs(DOCUMENT)):
        node: Any = DOCUMENT
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, f"dangling {ref}"
            node = node[part]
    ids = [op["operationId"] for _, _, op in _operations()]
    assert len(ids) == len(set(ids))
    for method, path, op in _operations():
        public = op.get("security") == []
        assert public or op["x-roles"], f"{method} {path}: roles"
        for status, response in op["responses"].items():
            if "$ref" not in response:
                assert "X-Request-Id" in response["headers"], f"{method} {path} {status}"
        if not public:
            assert {"401", "403", "500", "503"} <= set(op["responses"]), f"{method} {path}"


def test_document_names_every_native_route(app: Flask) -> None:
    """Every native route of the app is in the document, and nothing else: a new or removed
    route fails here until the document follows."""
    routes = {
        (method, re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule))
        for rule in app.url_map.iter_rules()
        if NATIVE.match(rule.rule)
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    documented = {(method, path) for method, path, _ in _operations()}
    assert documented == routes


def test_document_is_served_without_a_token(app: Flask) -> None:
    r = app.test_client().get("/v1/openapi.json")
    assert r.status_code == 200
    assert r.mimetype == "application/json"
    assert r.json == DOCUMENT


# -- the property-based run against a real server ------------------------------------------

EXAMPLES = 40  # generated requests per operation and mode, on top of the coverage phase
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "ignored_auth",
]
SERVICE_KEY = "fuzz-crypto"  # granted to the service principal; only crypto calls use it
ADMIN_KEY = "fuzz-admin"  # what the admin operations act on (disable, rotate, delete...)
GROUPS = ("keyholder", "spare")  # the required group; the group of the custodian revoked
# the custodians pinned at deployment (name, group): the two approvers of every change
CUSTODIANS = (("custodian", GROUPS[0]), ("spare", GROUPS[1]))
TIMES = {"since": "2020-01-01", "until": "2100-01-01"}  # a period that covers the run
# the principal or custodian a lifecycle operation acts on (not the service the crypto
# operations need)
NAMES = {
    "revoke_custodian": "spare",
    "disable_principal": "target",
    "enable_principal": "target",
    "end_sessions": "target",
}


@dataclass
class World:
    """A running server and the names the run swaps into part of the valid requests."""

    server: Server
    tokens: dict[str, str]  # role -> token of a principal named after the role
    keys: dict[str, Ed25519PrivateKey]  # custodian name -> its signing key
    custodian_tokens: dict[str, str] = field(default_factory=dict)  # custodian name -> token
    blob: str = ""  # a datakey ciphertext under SERVICE_KEY, empty context
    case_id: str = ""  # a case the run amends, decides on, revokes and closes
    active_case_id: str = ""  # an approved, active case of "requester" over SERVICE_KEY
    # operation -> the pending change it acts on (read and approved, rejected, cancelled)
    changes: dict[str, str] = field(default_factory=dict)
    # approved changes of several kinds, applied one after the other (the last stays)
    applicable: list[str] = field(default_factory=list)

    def call(
        self, method: str, path: str, role: str, body: Any = None, token: str | None = None
    ) -> requests.Response:
        return requests.request(
            method,
            self.server.url + path,
            json=body,
            headers={"Authorization": f"Bearer {token or self.tokens[role]}"},
            timeout=30,
        )

    def ok(self, method: str, path: str, role: str, body: Any = None) -> dict[str, Any]:
        r = self.call(method, path, role, body)
        assert r.status_code in (200, 201), r.text
        return dict(r.json())

    def propose(self, method: str, path: str, body: Any = None) -> str:
        """A gated request by the admin: recorded as a pending change (202); its id."""
        r = self.call(method, path, "admin", body)
        assert r.status_code == 202, r.text
        assert r.json()["change"]["state"] == "pending"
        return str(r.json()["change"]["change_id"])

    def approved(self, method: str, path: str, body: Any = None) -> str:
        """A gated request proposed and approved by both custodians (not applied)."""
        change_id = self.propose(method, path, body)
        for name, _ in CUSTODIANS:
            decision = {"custodian": name, "signature": self.change_signature(change_id, name)}
            r = self.call(
                "POST",
                f"/v1/changes/{change_id}/approve",
                "custodian",
                decision,
                token=self.custodian_tokens[name],
            )
            assert r.status_code == 200, r.text
        assert self.ok("GET", f"/v1/changes/{change_id}", "admin")["change"]["approved"]
        return change_id

    def through(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """A gated request taken through dual control: proposed, approved, applied by its
        proposer; what applying it answers (the request's own answer)."""
        change_id = self.approved(method, path, body)
        return self.ok("POST", f"/v1/changes/{change_id}/apply", "admin", {})

    def principal(self, name: str, role: str) -> str:
        """A new principal's token (a service or requester through dual control)."""
        body = {"name": name, "role": role}
        if role in ("service", "requester", "admin"):
            return str(self.through("POST", "/v1/principals", body)["token"])
        return str(self.ok("POST", "/v1/principals", "admin", body)["token"])

    def file_case(self, max_unwraps: int) -> str:
        body = {
            "legal_basis": "court order 17",
            "reference": "case-17",
            "justification": "legal_request",
            "scope": {"keys": [SERVICE_KEY]},
            "max_unwraps": max_unwraps,
            "expires_in_seconds": 86400,
        }
        return str(self.ok("POST", "/v1/escrow/cases", "requester", body)["case_id"])

    def signature(self, case_id: str, decision: str) -> str:
        """The custodian's signature of ``decision`` over the case as it is now."""
        digest = escrowfmt.case_digest(self.ok("GET", f"/v1/escrow/cases/{case_id}", "admin"))
        signed = self.keys["custodian"].sign(escrowfmt.signed_message(digest, decision))
        return base64.b64encode(signed).decode()

    def change_signature(self, change_id: str, who: str, decision: str = "approve") -> str:
        """``who``'s signature of ``decision`` over the change, its digest recomputed from
        the change's fields as an approver does (kms/formats/change.py)."""
        change = self.ok("GET", f"/v1/changes/{change_id}", "admin")["change"]
        digest = changefmt.change_digest(change)
        signed = self.keys[who].sign(escrowfmt.signed_message(digest, decision))
        return base64.b64encode(signed).decode()


def _init(data: Path, keys: dict[str, Ed25519PrivateKey], env: dict[str, str]) -> Path:
    """``kms init`` as a deployment runs it (dual control, the server's configuration),
    pinning the custodians of CUSTODIANS (the API adds no group's first member)."""
    pins = []
    for name, group in CUSTODIANS:
        raw = (
            keys[name]
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        pins += ["--custodian", f"{name}:{group}:{base64.b64encode(raw).decode()}"]
    done = run_kms("init", "--data-dir", str(data), *pins, env=env)
    assert done.returncode == 0, done.stderr
    assert "control policy: mode=dual" in done.stdout, done.stdout
    return data


def _build(server: Server, keys: dict[str, Ed25519PrivateKey]) -> World:
    world = World(server, {"admin": server.admin_token}, keys)
    for name, _ in CUSTODIANS:
        token_file = server.data_dir / f"custodian-{name}.token"
        world.custodian_tokens[name] = token_file.read_text().strip()
    world.tokens["custodian"] = world.custodian_tokens["custodian"]
    for role in ("service", "auditor", "requester"):
        world.tokens[role] = world.principal(role, role)
    world.principal("target", "service")
    for alias in (SERVICE_KEY, ADMIN_KEY):
        world.ok("POST", "/v1/keys", "admin", {"alias": alias})
    grant = {
        "principal": "service",
        "operations": ["datakey", "encrypt", "decrypt", "rewrap"],
        "justifications": ["service_processing", "customer_initiated"],
    }
    world.through("POST", f"/v1/keys/{SERVICE_KEY}/grants", grant)
    world.blob = world.ok("POST", f"/v1/keys/{SERVICE_KEY}/datakey", "service")["ciphertext"]
    world.case_id = world.file_case(1)
    world.active_case_id = world.file_case(100_000)
    decision = {
        "custodian": "custodian",
        "signature": world.signature(world.active_case_id, "approve"),
    }
    world.ok("POST", f"/v1/escrow/cases/{world.active_case_id}/approvals", "custodian", decision)
    deadline = time.monotonic() + 30  # active once the data owner was told (no waiting period)
    while world.ok("GET", f"/v1/escrow/cases/{world.active_case_id}", "admin")["state"] != "active":
        assert time.monotonic() < deadline, "the case did not become active"
        time.sleep(0.2)
    # pending changes for the approval routes (each its own: a rejection or a cancellation
    # ends one), and approved ones whose answers are the gated operations' 200 and 201
    pending = {
        op_id: world.propose("POST", "/v1/principals", {"name": f"p-{op_id}", "role": "service"})
        for op_id in ("approve_change", "reject_change", "cancel_change")
    }
    world.changes = {"read_change": pending["approve_change"], **pending}
    world.applicable = [
        world.approved("POST", "/v1/principals", {"name": "applied", "role": "service"}),
        world.approved("POST", f"/v1/keys/{SERVICE_KEY}/grants", grant),
        world.approved("POST", "/v1/principals/service/sigv4-credentials", {}),
        world.approved("PUT", "/v1/control-policy", world.ok("GET", "/v1/control-policy", "admin")),
    ]
    return world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A server with escrow configured, under dual control: a token per role, two keys, a
    grant, a blob, two custodians, a pending case and an active one, pending changes and
    approved ones.

    Dual control, as ``kms init`` deploys by default, gives the run the more meaningful
    coverage: it sees what a real deployment answers (every gated operation a 202 with a
    pending change, the document's ChangeProposed), and it drives the /v1/changes routes
    with real changes (read, approved, rejected, cancelled; approved ones applied, whose
    answers are the gated operations' own 200 and 201 bodies). In single-operator mode the
    approval routes would only ever refuse, and generated requests would take effect at
    once: a valid PUT /v1/control-policy would switch the server to dual control (or change
    its quorum) in the middle of the run, so that what the rest of the run sees would
    depend on the order of the operations."""
    tmp = tmp_path_factory.mktemp("openapi")
    secret = tmp / "webhook.secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)  # as the server requires
    receiver = Receiver()
    env = {
        "KMS_ESCROW_WEBHOOK_URL": receiver.url,
        "KMS_ESCROW_WEBHOOK_SECRET_FILE": str(secret),
        "KMS_ESCROW_REQUIRED_GROUPS": GROUPS[0],
        "KMS_ESCROW_GROUPS": ",".join(GROUPS),
        "KMS_ESCROW_QUORUM": "1",
        "KMS_ESCROW_WAITING_PERIOD_SECONDS": "0",
    }
    try:
        keys = {name: Ed25519PrivateKey.generate() for name, _ in CUSTODIANS}
        data = _init(tmp / "data", keys, env)
        with gunicorn_server(data, workers=2, env=env) as server:
            yield _build(server, keys)
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


# The document as packaged; test_served_document_is_the_packaged_one checks that the server
# serves exactly this, so the run tests what clients download from /v1/openapi.json.
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "seed": 14,
            "phases": {
                "examples": {"enabled": False},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            "generation": {
                "mode": "all",
                "max-examples": EXAMPLES,
                "database": "none",
                "allow-extra-parameters": False,  # unknown query parameters are ignored
            },
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        }
    ),
)


def _pick(case: Any, *parts: Any) -> bool:
    """A deterministic half of the valid cases, by the generated data: those get known
    names so that operations also succeed; the rest keep what was generated. (A valid
    case's body is as documented: an object with its required fields.)"""
    if case.meta is None or case.meta.generation.mode.is_negative:
        return False
    return zlib.crc32(repr(parts).encode()) % 2 == 0


def _unwrap(item: dict[str, Any], op_id: str, world: World) -> None:
    """A decrypt or rewrap body (or batch item) that can succeed: the known blob."""
    item["ciphertext"] = world.blob
    item.pop("context", None)
    item.pop("case_id", None)
    if item.get("justification") not in (None, "customer_initiated"):
        item["justification"] = "service_processing"
    if op_id == "rewrap" and item.get("destination_key") is not None:
        item["destination_key"] = SERVICE_KEY


def _prepare(case: Any, world: World) -> str:
    """Swap known names into the case (see _pick); the role whose token it is sent with."""
    op_id = case.operation.definition.raw["operationId"]
    role = str(case.operation.definition.raw["x-roles"][0])
    params, query, body = case.path_parameters or {}, case.query or {}, case.body
    if "ref" in params and _pick(case, params["ref"]):
        params["ref"] = SERVICE_KEY if op_id in ("datakey", "encrypt") else ADMIN_KEY
    if "name" in params and _pick(case, params["name"]):
        params["name"] = NAMES.get(op_id, "service")
    for name in set(TIMES) & set(query):
        if _pick(case, query[name]):
            query[name] = TIMES[name]
    if "case_id" in params and _pick(case, params["case_id"]):
        params["case_id"] = world.case_id
        if op_id in ("approve_case", "reject_case") and _pick(case, body):
            decision = "approve" if op_id == "approve_case" else "reject"
            body.update(custodian="custodian", signature=world.signature(world.case_id, decision))
    if "change_id" in params and _pick(case, params["change_id"]):
        if op_id == "apply_change":
            params["change_id"] = world.applicable[0]
        else:
            params["change_id"] = world.changes[op_id]
        if op_id in ("approve_change", "reject_change") and _pick(case, body):
            decision = op_id.removesuffix("_change")
            signature = world.change_signature(params["change_id"], "custodian", decision)
            body.update(custodian="custodian", signature=signature)
    if op_id == "grant" and _pick(case, body):
        body["principal"] = "service"
    if op_id in ("decrypt", "rewrap") and _pick(case, body):
        for item in body.get("items", [body]):
            if _pick(case, item):
                _unwrap(item, op_id, world)
        if op_id == "decrypt" and "items" not in body and _pick(case, body, "escrow"):
            body.update(case_id=world.active_case_id, justification="legal_request")
            role = "requester"
    others = [r for r in world.tokens if r not in case.operation.definition.raw["x-roles"]]
    if others and zlib.crc32(repr((params, query, body)).encode()) % 8 == 0:  # one in 8: 403
        role = others[0]
    applied = op_id == "apply_change" and params.get("change_id") == world.applicable[0]
    if applied and role == "admin" and len(world.applicable) > 1:
        world.applicable.pop(0)  # applied now: the next case gets the next change
    return role


@pytest.mark.e2e
@schema.exclude(path_regex=r"^/(healthz|readyz|metrics)$|^/v1/openapi\.json$").parametrize()
@settings(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_document(case: Any, world: World) -> None:
    role = _prepare(case, world)
    excluded = []
    if isinstance(case.body, dict) and "items" in case.body:
        # A batch answers an invalid item (unknown key, justification, ...) with an error in
        # its result, in a 200; only a malformed batch (types, lengths) is refused whole.
        excluded.append(schemathesis.checks.negative_data_rejection)
    case.call_and_validate(
        base_url=world.server.url,
        headers={"Authorization": f"Bearer {world.tokens[role]}"},
        excluded_checks=excluded,
        timeout=30,
    )


@pytest.mark.e2e
def test_public_endpoints_conform(world: World) -> None:
    """The unauthenticated operations (no input to generate) answer as documented."""
    for path in ("/healthz", "/readyz", "/metrics", "/v1/openapi.json"):
        schema[path]["GET"].Case().call_and_validate(base_url=world.server.url, timeout=30)


@pytest.mark.e2e
def test_served_document_is_the_packaged_one(world: World) -> None:
    served = requests.get(world.server.url + "/v1/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == DOCUMENT
