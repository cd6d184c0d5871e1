"""A deployment under dual control for functional tests (kms/services/changes.py): a real
SoftHSM token, a fresh SQLite database, a settable clock, the data owner's webhook
receiver, and three custodians pinned as ``kms init --custodian`` pins them:
``officer`` (group keyholder), ``dpo`` (data_owner) and ``counsel`` (legal).

The escrow policy requires keyholder and data_owner and lets data_owner veto; the change
policy defaults to those groups with a quorum of 2. Approvals are signed here as a
custodian signs them offline: Ed25519 over the digest recomputed from the change's
fields (kms/formats/change.py), in the escrow signing model (kms/formats/escrow.py)."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms import config
from kms.app import create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from kms.formats import change as changefmt
from kms.formats import escrow as escrowfmt
from tests.helpers import SECRET, Api, ManualClock, Receiver

CUSTODIANS = (("officer", "keyholder"), ("dpo", "data_owner"), ("counsel", "legal"))
APPROVERS = ("officer", "dpo")


@dataclasses.dataclass
class Board:
    api: Api
    services: Any
    clock: ManualClock
    receiver: Receiver
    custodians: dict[str, tuple[dict[str, str], Ed25519PrivateKey]]

    def propose(self, method: str, path: str, body: Any = None, headers: Any = None) -> Any:
        """Make a gated request; assert it was recorded as a pending change (202)."""
        r = self.api.call(method, path, headers or self.api.admin, json=body)
        assert r.status_code == 202, r.json
        assert r.json["change"]["state"] == "pending"
        return dict(r.json["change"])

    def change(self, change_id: str) -> dict[str, Any]:
        r = self.api.call("GET", f"/v1/changes/{change_id}", self.api.admin)
        assert r.status_code == 200, r.json
        return dict(r.json["change"])

    def sign(
        self,
        change: dict[str, Any],
        who: str,
        decision: str = "approve",
        key: Ed25519PrivateKey | None = None,
    ) -> Any:
        """``who`` signs ``change`` (as the server shows it; the digest recomputed here)
        with its own key (or ``key``) and submits it with its own token."""
        headers, own = self.custodians[who]
        digest = changefmt.change_digest(change)
        signature = (key or own).sign(escrowfmt.signed_message(digest, decision))
        return self.api.call(
            "POST",
            f"/v1/changes/{change['change_id']}/{decision}",
            headers,
            json={"custodian": who, "signature": base64.b64encode(signature).decode()},
        )

    def approve(self, change: dict[str, Any], who: tuple[str, ...] = APPROVERS) -> None:
        for name in who:
            r = self.sign(change, name)
            assert r.status_code == 200, r.json

    def apply(self, change_id: str, headers: dict[str, str] | None = None) -> Any:
        return self.api.call(
            "POST", f"/v1/changes/{change_id}/apply", headers or self.api.admin, json={}
        )

    def through(self, method: str, path: str, body: Any = None) -> Any:
        """A gated request taken through the whole procedure: proposed, approved by
        officer and dpo, applied; returns the apply's response (asserted 2xx)."""
        change = self.propose(method, path, body)
        self.approve(change)
        r = self.apply(change["change_id"])
        assert r.status_code in (200, 201), r.json
        return r

    def service(self, name: str) -> dict[str, str]:
        """A service principal created through dual control; its auth headers."""
        r = self.through("POST", "/v1/principals", {"name": name, "role": "service"})
        return {"Authorization": f"Bearer {r.json['token']}", "X-Name": name}

    def grant(self, key: str, who: str, ops: list[str]) -> None:
        body = {"principal": who, "operations": ops}
        self.through("POST", f"/v1/keys/{key}/grants", body)


def board_settings(settings: config.Settings, receiver: Receiver, **extra: Any) -> Any:
    board = {
        "control_mode": "dual",
        "escrow_quorum": 2,
        "escrow_required_groups": frozenset({"keyholder", "data_owner"}),
        "escrow_veto_groups": frozenset({"data_owner"}),
        "escrow_groups": frozenset({"legal"}),
        "escrow_waiting_period_seconds": 3600,
        "escrow_webhook_url": receiver.url,
        "escrow_webhook_secret": SECRET,
    }
    return dataclasses.replace(settings, **{**board, **extra})


def make_board(
    settings: config.Settings,
    hsm: Pkcs11Hsm,
    storage: SqlStorage,
    receiver: Receiver,
    **extra: Any,
) -> Iterator[Board]:
    """The deployment (a generator for a fixture): admin token, pinned custodians."""
    clock = ManualClock()
    app = create_app(
        board_settings(settings, receiver, **extra), hsm=hsm, storage=storage, clock=clock
    )
    services = app.extensions["kms"]
    token = services.principals.bootstrap_admin("admin")
    assert token
    api = Api(app.test_client(), token)
    custodians = {}
    for name, group in CUSTODIANS:
        headers = api.principal("custodian", name)  # not a change: a custodian alone can do nothing
        key = Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        assert services.custodians.pin_custodian(name, group, raw) is None
        custodians[name] = (headers, key)
    yield Board(api, services, clock, receiver, custodians)
