"""One deployment per example of the stateful dual-control test
(tests/functional/test_dual_control_stateful.py), and the probes its invariants run.

A deployment is tests/dual_control_support.py's board (dual control, custodians officer,
dpo and counsel pinned) on a fresh SQLite database anchored in the session's SoftHSM
token, with the data owner's world made through the proper procedure before the admin
acts alone:

- key ``records`` (the data owner's), and ``loot`` (the admin's own);
- service ``app`` created and granted datakey and decrypt on ``records`` through dual
  control (proposed by the admin, approved by officer and dpo, applied);
- victim blobs: data keys ``app`` made under ``records`` (context patient=p<i>), which
  the admin did not encrypt;
- requester ``police`` created through dual control, and an escrow case it filed over
  ``records`` that officer (keyholder) and counsel (legal) approved and the data owner
  did not: two approvals, a quorum by count, lacking the data owner's group;
- service ``svc`` created through dual control, with no grant: the admin applied that
  change, so it holds svc's token (and may grant svc what needs no approval: encrypt,
  rewrap).

The admin holds none of the tokens of app, police or the custodians, and none of the
custodians' private keys.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from kms import config
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage, make_engine, upgrade
from kms.services.seals import RowSeals
from tests import escrow_support
from tests.dual_control_support import Board, make_board
from tests.helpers import Receiver, anchored
from tests.sigv4_request import signed

DATA_OWNER_MEMBERS = frozenset({"dpo"})  # the data owner's group as pinned at deployment
ROLES = {  # the principals of a deployment once set up
    "admin": "admin",
    "app": "service",
    "svc": "service",
    "police": "requester",
    "officer": "custodian",
    "dpo": "custodian",
    "counsel": "custodian",
}
CASE_BODY: dict[str, Any] = {
    "legal_basis": "Court order 2026/117, art. 57 code of criminal procedure",
    "reference": "INV-2026-117",
    "justification": "legal_request",
    "scope": {"keys": ["records"], "context": {"patient": "p0"}},
    "max_unwraps": 5,
    "expires_in_seconds": 7 * 86400,
}


@dataclass(frozen=True)
class Bearer:
    """A bearer token the admin holds (its own, or one in an answer it got)."""

    owner: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass(frozen=True)
class SigV4:
    """A SigV4 credential the admin holds."""

    owner: str
    access_key_id: str
    secret: str


@dataclass(frozen=True)
class Blob:
    """A blob whose plaintext the admin must never see."""

    ciphertext: str  # base64
    context: dict[str, str]


@dataclass
class Deployment:
    board: Board
    engine: sa.Engine
    records_id: str
    blobs: list[Blob]
    plaintexts: list[str]  # base64, of the victim blobs
    police_case: str
    svc: Bearer  # the admin's own service
    stack: ExitStack = field(default_factory=ExitStack)

    def close(self) -> None:
        """Drop the HSM anchors of the database and dispose of its engine."""
        self.stack.close()

    def case_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.text("SELECT case_id FROM escrow_cases"))]

    def approvers(self, case_id: str, version: int) -> set[str]:
        """Custodians whose approval of this version of the case is stored."""
        query = sa.text(
            "SELECT custodian FROM escrow_decisions "
            "WHERE case_id = :c AND version = :v AND decision = 'approve'"
        )
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(query, {"c": case_id, "v": version})}

    def leaks(self, response: Any) -> bool:
        """Whether the response holds the plaintext of a victim blob."""
        text = response.get_data(as_text=True)
        return any(p in text for p in self.plaintexts)

    def aws_decrypt(self, credential: SigV4, blob: Blob, now: datetime) -> Any:
        """TrentService.Decrypt of ``blob`` through the AWS KMS face, signed at ``now``
        (the deployment's clock) with ``credential``."""
        body = {"CiphertextBlob": blob.ciphertext, "EncryptionContext": blob.context}
        headers, data = signed(
            credential.access_key_id,
            credential.secret,
            target="TrentService.Decrypt",
            body=body,
            when=now,
        )
        return self.board.api.client.post("/", data=data, headers=headers)


def open_deployment(
    settings: config.Settings,
    hsm: Pkcs11Hsm,
    receiver: Receiver,
    db_path: Path,
    blobs: int = 2,
) -> Deployment:
    """A fresh deployment (see module); close() it."""
    stack = ExitStack()
    try:
        engine = make_engine(f"sqlite:///{db_path}", "NORMAL")
        stack.callback(engine.dispose)
        upgrade(engine)
        storage = SqlStorage(engine, RowSeals(hsm))
        stack.enter_context(anchored(storage, hsm))  # dropped before the engine is disposed
        board = next(make_board(settings, hsm, storage, receiver))
        api = board.api
        records = api.call("POST", "/v1/keys", api.admin, json={"alias": "records"})
        assert records.status_code == 201, records.json
        loot = api.call("POST", "/v1/keys", api.admin, json={"alias": "loot"})
        assert loot.status_code == 201, loot.json
        app = board.service("app")
        board.grant("records", "app", ["datakey", "decrypt"])
        made, plaintexts = [], []
        for i in range(blobs):
            context = {"patient": f"p{i}"}
            r = api.call("POST", "/v1/keys/records/datakey", app, json={"context": context})
            assert r.status_code == 200, r.json
            made.append(Blob(r.json["ciphertext"], context))
            plaintexts.append(r.json["plaintext"])
        police = board.through("POST", "/v1/principals", {"name": "police", "role": "requester"})
        police_headers = {"Authorization": f"Bearer {police.json['token']}"}
        filed = api.call("POST", "/v1/escrow/cases", police_headers, json=CASE_BODY)
        assert filed.status_code == 201, filed.json
        case_id = filed.json["case_id"]
        for who in ("officer", "counsel"):  # not the data owner
            case = api.call("GET", f"/v1/escrow/cases/{case_id}", api.admin).json
            r = escrow_support.decide(api, board.custodians, case, who)
            assert r.status_code == 201, r.json
        case = api.call("GET", f"/v1/escrow/cases/{case_id}", api.admin).json
        assert case["state"] == "pending" and case["approvals"] == ["counsel", "officer"], case
        svc = board.through("POST", "/v1/principals", {"name": "svc", "role": "service"})
        deployment = Deployment(
            board,
            engine,
            records.json["key_id"],
            made,
            plaintexts,
            case_id,
            Bearer("svc", svc.json["token"]),
            stack,
        )
    except BaseException:
        stack.close()
        raise
    return deployment


def body_of(response: Any) -> dict[str, Any]:
    """The JSON object of an answer ({} if it is none)."""
    try:
        found = json.loads(response.get_data(as_text=True) or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
