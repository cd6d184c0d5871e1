"""An admin alone, under dual control (kms/services/changes.py), never reaches plaintext
it did not encrypt nor an escrow case without the data owner.

A hypothesis state machine drives random sequences of control-plane calls made with the
admin's token only, and with every credential the admin obtains along the way (tokens
and SigV4 secrets in the answers it gets; custodian principals it created, signing with
Ed25519 keys it made itself). It opens with the moves such attacks start with (a
custodian principal of its own proposed into a group; a service of its own, and a grant
to it on the data owner's key), then: principals of every role, names colliding or not;
grants of every operation on every key; SigV4 credentials, tokens issued and rotated
for others; custodians registered (endorsed by keys it does not hold, or by its own)
and revoked; escrow and control policies; principals and keys disabled and enabled;
every change it has seen applied, cancelled, approved or rejected; escrow cases filed
and decided with what it holds; time passing.

After every step: no credential the admin holds decrypts a victim blob (native
``/v1/decrypt``, also under every escrow case; a rewrap, then decrypted; the AWS KMS
face), no escrow case is approved or active without an approval by the data owner's
group, and no call answered 5xx. The deployment: tests/dual_control_stateful_support.py.
"""

from __future__ import annotations

import base64
import itertools
from pathlib import Path
from typing import Any

import hypothesis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kms import config
from kms.backends.hsm import Pkcs11Hsm
from kms.formats import change as changefmt
from kms.formats import escrow as escrowfmt
from kms.services.model import JUSTIFICATIONS, Permission
from tests.dual_control_stateful_support import (
    CASE_BODY,
    DATA_OWNER_MEMBERS,
    ROLES,
    Bearer,
    Blob,
    Deployment,
    SigV4,
    body_of,
    open_deployment,
)
from tests.helpers import Receiver

# a principal name: of the victim's (app, police: drawn most), taken (the admin's own
# service svc, the custodians, the admin), or fresh
VICTIMS = st.sampled_from(("app", "police"))
FRESH = st.sampled_from(("eve", "mal", "trent"))
TAKEN = st.sampled_from(("app", "police", "svc", "dpo", "officer", "counsel", "admin"))
NAMES = VICTIMS | TAKEN | FRESH
ANY_ROLE = st.sampled_from(("service", "requester", "admin", "auditor", "custodian"))
KEYS = st.sampled_from(("records", "loot", "records-id"))
OPERATIONS = st.lists(st.sampled_from(sorted(Permission)), unique=True, max_size=4)
UNGATED = ("encrypt", "rewrap", "xks_encrypt")  # operations that return no plaintext
GROUPS = st.lists(st.sampled_from(("keyholder", "data_owner", "legal", "rogue")), unique=True)
INDEX = st.integers(min_value=0, max_value=1 << 16)  # into a list the machine grew
MAX_DERIVED = 4  # rewrapped victim blobs kept to decrypt


class AdminAlone(RuleBasedStateMachine):
    def __init__(self, deployment: Deployment) -> None:
        super().__init__()
        self.d = deployment
        self.api = deployment.board.api
        self.admin = Bearer("admin", self.api.admin["Authorization"].split(" ", 1)[1])
        self.bearers: list[Bearer] = [self.admin, deployment.svc]
        self.roles = dict(ROLES)  # principal name -> role, as the admin saw them
        self.sigv4: list[SigV4] = []
        self.changes: dict[str, dict[str, Any]] = {}  # id -> the change as last shown
        self.own_keys: dict[str, Ed25519PrivateKey] = {}  # custodian keys the admin made
        self.derived: list[Blob] = []  # victim blobs rewrapped by a credential it holds

    def teardown(self) -> None:
        self.d.close()

    # -- calls ----------------------------------------------------------------------------

    def call(
        self, method: str, path: str, body: Any = None, who: Bearer | None = None
    ) -> tuple[int, dict[str, Any]]:
        """A request as the admin (or ``who``); never a 5xx; harvests what it yields."""
        headers = (who or self.admin).headers
        r = self.api.call(method, path, headers, json=body)
        assert r.status_code < 500, (method, path, r.status_code, r.get_data(as_text=True))
        assert not self.d.leaks(r), (method, path, r.get_data(as_text=True))
        found = body_of(r)
        if r.status_code == 202:
            change = found["change"]
            self.changes[change["change_id"]] = change
        return r.status_code, found

    def harvest(self, status: int, found: dict[str, Any], owner: str) -> None:
        """Keep the credential an answer holds (a token, a SigV4 secret) for ``owner``."""
        if status not in (200, 201):
            return
        if "role" in found:
            self.roles[found["name"]] = found["role"]
        if "token" in found:
            bearer = Bearer(str(found.get("name", owner)), found["token"])
            self.bearers.append(bearer)
            if bearer.owner == "admin" and "replaces" in found:
                self.admin = bearer  # its own token rotated: the old one has expired
        if "secret_access_key" in found:
            self.sigv4.append(SigV4(owner, found["access_key_id"], found["secret_access_key"]))

    def key(self, ref: str) -> str:
        return self.d.records_id if ref == "records-id" else ref

    def custodian_key(self, name: str) -> Ed25519PrivateKey:
        """The admin's own Ed25519 key for ``name`` (made on first use)."""
        return self.own_keys.setdefault(name, Ed25519PrivateKey.generate())

    def custodian_bearers(self) -> list[Bearer]:
        """The tokens the admin holds of custodian principals (those it created)."""
        return [b for b in self.bearers if self.roles.get(b.owner) == "custodian"]

    # -- the opening: moves every attack starts with, then random steps -------------------

    @initialize(
        group=st.sampled_from(("data_owner", "keyholder", "legal")),
        endorser=st.none() | st.sampled_from(("dpo", "officer", "counsel", "mal")),
    )
    def enrol_own_custodian(self, group: str, endorser: str | None) -> None:
        """Custodian principal mal (needs no approval), its key the admin's own, proposed
        as a member of ``group``: the custodian steps below then act as mal."""
        self.create_principal("mal", "custodian")
        self.register_custodian("mal", group, endorser)

    @initialize(operations=OPERATIONS)
    def service_for_the_victims_key(self, operations: list[str]) -> None:
        """A service of the admin's own, proposed, with a grant on ``records`` proposed."""
        self.create_principal("eve", "service")
        self.grant("records", "eve", operations, None)

    # -- principals, grants, credentials ------------------------------------------------

    @rule(name=NAMES, role=ANY_ROLE)
    def create_principal(self, name: str, role: str) -> None:
        status, found = self.call("POST", "/v1/principals", {"name": name, "role": role})
        self.harvest(status, found, name)

    @rule(name=FRESH, role=st.sampled_from(("auditor", "custodian")))
    def create_ungated_principal(self, name: str, role: str) -> None:
        """As create_principal, of a role that needs no approval (so drawn more often):
        the credentials the admin gets under dual control."""
        self.create_principal(name, role)

    @rule(
        key=KEYS,
        name=NAMES,
        operations=OPERATIONS,
        justifications=st.none() | st.lists(st.sampled_from(sorted(JUSTIFICATIONS)), max_size=3),
    )
    def grant(
        self, key: str, name: str, operations: list[str], justifications: list[str] | None
    ) -> None:
        body: dict[str, Any] = {"principal": name, "operations": operations}
        if justifications is not None:
            body["justifications"] = justifications
        self.call("POST", f"/v1/keys/{self.key(key)}/grants", body)

    @rule(key=KEYS, operations=st.lists(st.sampled_from(UNGATED), unique=True))
    def grant_own_service(self, key: str, operations: list[str]) -> None:
        """As grant, of what needs no approval to the admin's own service (so drawn more
        often): svc may then rewrap victim blobs within their key, and no more."""
        self.grant(key, "svc", operations, None)

    @rule(name=NAMES)
    def issue_sigv4(self, name: str) -> None:
        status, found = self.call("POST", f"/v1/principals/{name}/sigv4-credentials", {})
        self.harvest(status, found, name)

    @rule(name=NAMES, ttl=st.none() | st.sampled_from((60, 86400)))
    def issue_token(self, name: str, ttl: int | None) -> None:
        body = {} if ttl is None else {"ttl_seconds": ttl}
        status, found = self.call("POST", f"/v1/principals/{name}/tokens", body)
        self.harvest(status, found, name)

    @rule(name=NAMES, grace=st.sampled_from((0, 3600)), newest=st.booleans())
    def rotate_token(self, name: str, grace: int, newest: bool) -> None:
        status, found = self.call("GET", f"/v1/principals/{name}/tokens")
        if status != 200 or not found["tokens"]:
            return
        token_id = found["tokens"][-1 if newest else 0]["token_id"]
        path = f"/v1/principals/{name}/tokens/{token_id}/rotate"
        status, found = self.call("POST", path, {"grace_seconds": grace})
        self.harvest(status, found, name)

    @rule(name=NAMES, enabled=st.booleans())
    def enable_principal(self, name: str, enabled: bool) -> None:
        self.call("POST", f"/v1/principals/{name}/{'enable' if enabled else 'disable'}", {})

    @rule(key=KEYS, enabled=st.booleans())
    def enable_key(self, key: str, enabled: bool) -> None:
        self.call("POST", f"/v1/keys/{self.key(key)}/{'enable' if enabled else 'disable'}", {})

    # -- custodians and policies --------------------------------------------------------

    @rule(
        name=NAMES,
        group=st.sampled_from(("keyholder", "data_owner", "legal", "rogue")),
        endorser=st.none() | st.sampled_from(("officer", "dpo", "counsel")) | FRESH,
    )
    def register_custodian(self, name: str, group: str, endorser: str | None) -> None:
        """With the admin's own key for ``name``, endorsed (or not) by a key of the admin's
        under the endorser's name: it holds no real custodian's private key."""
        raw = (
            self.custodian_key(name)
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        body: dict[str, Any] = {
            "name": name,
            "group": group,
            "public_key": base64.b64encode(raw).decode(),
        }
        if endorser is not None:
            signature = self.custodian_key(endorser).sign(
                escrowfmt.enrolment_message(name, group, raw)
            )
            body["endorsement"] = {
                "custodian": endorser,
                "signature": base64.b64encode(signature).decode(),
            }
        self.call("POST", "/v1/custodians", body)

    @rule(name=NAMES)
    def revoke_custodian(self, name: str) -> None:
        self.call("DELETE", f"/v1/custodians/{name}")

    @rule(key=KEYS, quorum=st.integers(1, 3), required=GROUPS, veto=GROUPS)
    def set_escrow_policy(
        self, key: str, quorum: int, required: list[str], veto: list[str]
    ) -> None:
        body = {"quorum": quorum, "required_groups": required, "veto_groups": veto}
        self.call("POST", f"/v1/keys/{self.key(key)}/escrow-policy", body)

    @rule(
        mode=st.sampled_from(("single-operator", "dual")),
        quorum=st.integers(1, 3),
        groups=GROUPS,
        ttl=st.sampled_from((300, 86400, 30 * 86400)),
    )
    def set_control_policy(self, mode: str, quorum: int, groups: list[str], ttl: int) -> None:
        body = {"mode": mode, "quorum": quorum, "required_groups": groups, "ttl_seconds": ttl}
        self.call("PUT", "/v1/control-policy", body)

    # -- changes ------------------------------------------------------------------------

    @rule()
    def list_changes(self) -> None:
        status, found = self.call("GET", "/v1/changes")
        assert status == 200
        for change in found["changes"]:
            self.changes[change["change_id"]] = change

    @precondition(lambda self: self.changes)
    @rule(i=st.none() | INDEX, who=INDEX)
    def apply_change(self, i: int | None, who: int) -> None:
        """Apply a change it saw (None: the latest), as itself or with another token."""
        change = self._change(i)
        bearer = self.bearers[who % len(self.bearers)]
        status, found = self.call("POST", f"/v1/changes/{change['change_id']}/apply", {}, bearer)
        self.harvest(status, found, str(change["params"].get("name", "")))

    @precondition(lambda self: self.changes)
    @rule(i=INDEX)
    def cancel_change(self, i: int) -> None:
        self.call("POST", f"/v1/changes/{self._change(i)['change_id']}/cancel", {})

    @precondition(lambda self: self.changes)
    @rule(i=st.none() | INDEX, decision=st.sampled_from(("approve", "reject")))
    def decide_change(self, i: int | None, decision: str) -> None:
        """Every custodian token the admin holds, and its own, submits a decision signed
        with the admin's own key for the token's owner."""
        change = self._change(i)
        status, shown = self.call("GET", f"/v1/changes/{change['change_id']}")
        if status != 200:
            return
        digest = changefmt.change_digest(shown["change"])
        for bearer in [*self.custodian_bearers(), self.admin]:
            body = self.decision(bearer.owner, digest, decision)
            self.call("POST", f"/v1/changes/{change['change_id']}/{decision}", body, bearer)

    def _change(self, i: int | None) -> dict[str, Any]:
        """The change of index ``i`` in the order seen (None: the latest seen)."""
        ids = list(self.changes)
        return self.changes[ids[-1 if i is None else i % len(ids)]]

    def decision(self, custodian: str, digest: bytes, decision: str) -> dict[str, str]:
        """A decision body, signed with the admin's own key for ``custodian``."""
        signature = self.custodian_key(custodian).sign(escrowfmt.signed_message(digest, decision))
        return {"custodian": custodian, "signature": base64.b64encode(signature).decode()}

    # -- escrow ---------------------------------------------------------------------------

    @rule(who=INDEX)
    def file_case(self, who: int) -> None:
        self.call("POST", "/v1/escrow/cases", CASE_BODY, self.bearers[who % len(self.bearers)])

    @rule(i=INDEX, decision=st.sampled_from(("approve", "reject")))
    def decide_case(self, i: int, decision: str) -> None:
        """As decide_change, for an escrow case (the admin reads every case id)."""
        cases = self.d.case_ids()
        case_id = cases[i % len(cases)]
        status, case = self.call("GET", f"/v1/escrow/cases/{case_id}")
        assert status == 200
        path = "approvals" if decision == "approve" else "rejections"
        for bearer in [*self.custodian_bearers(), self.admin]:
            body = self.decision(bearer.owner, escrowfmt.case_digest(case), decision)
            self.call("POST", f"/v1/escrow/cases/{case_id}/{path}", body, bearer)

    @rule(seconds=st.sampled_from((60, 3601, 86400)))
    def time_passes(self, seconds: int) -> None:
        self.d.board.clock.advance(seconds)

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def no_plaintext_of_the_victim(self) -> None:
        """No credential the admin holds opens a victim blob: decrypt (also under every
        escrow case), rewrap to the admin's key or within the data owner's (a blob that
        comes back is a victim blob too, decrypted at the next check), the AWS KMS face."""
        blobs = self.d.blobs + self.derived
        cases = self.d.case_ids()
        items: list[dict[str, Any]] = [
            {"ciphertext": b.ciphertext, "context": b.context} for b in blobs
        ]
        items += [
            {**item, "justification": "legal_request", "case_id": case_id}
            for item, case_id in itertools.product(items, cases)
        ]
        rewraps = [
            {**item, **to}
            for item, to in itertools.product(
                items[: len(blobs)], ({"destination_key": "loot"}, {})
            )
        ]
        for bearer in self.bearers:
            status, found = self.call("POST", "/v1/decrypt", {"items": items}, bearer)
            assert status != 200 or all("plaintext" not in x for x in found["results"]), found
            status, found = self.call("POST", "/v1/rewrap", {"items": rewraps}, bearer)
            if status == 200:
                for result, item in zip(found["results"], rewraps, strict=True):
                    if "ciphertext" in result and len(self.derived) < MAX_DERIVED:
                        self.derived.append(Blob(result["ciphertext"], item["context"]))
        now = self.d.board.clock.now()
        for credential, blob in itertools.product(self.sigv4, blobs):
            r = self.d.aws_decrypt(credential, blob, now)
            assert r.status_code < 500, r.get_data(as_text=True)
            assert not self.d.leaks(r) and r.status_code != 200, r.get_data(as_text=True)

    @invariant()
    def no_case_open_to_unwrap_without_the_data_owner(self) -> None:
        for case_id in self.d.case_ids():
            status, case = self.call("GET", f"/v1/escrow/cases/{case_id}")
            assert status == 200, case
            if case["state"] in ("approved", "active"):
                approvers = self.d.approvers(case_id, case["version"])
                assert approvers & DATA_OWNER_MEMBERS, (case, approvers)


RUN = hypothesis.settings(
    max_examples=20,
    stateful_step_count=20,
    deadline=None,
    database=None,  # a failure prints the whole sequence of steps; nothing to replay from
    report_multiple_bugs=False,  # one counterexample, shrunk in a minute or two, not five
)


def test_an_admin_alone_reaches_no_plaintext_and_no_escrow_case(
    settings: config.Settings, hsm: Pkcs11Hsm, receiver: Receiver, tmp_path: Path
) -> None:
    examples = itertools.count()

    class OnAFreshDeployment(AdminAlone):
        def __init__(self) -> None:
            path = tmp_path / f"example-{next(examples)}.sqlite3"
            super().__init__(open_deployment(settings, hsm, receiver, path))

    run_state_machine_as_test(OnAFreshDeployment, settings=RUN)
