"""The types of dual control (kms/services/changes.py): the control policy, a proposed
change, an approver's decision."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

GROUP_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a custodian group's name

DUAL = "dual"
SINGLE_OPERATOR = "single-operator"
MODES = (DUAL, SINGLE_OPERATOR)

# change kinds: what each gated service method records (kms/formats/change.py)
KINDS = (
    "create_principal",
    "grant",
    "issue_sigv4",
    "issue_token",
    "register_custodian",
    "revoke_custodian",
    "set_escrow_policy",
    "set_xks_policy",
    "schedule_deletion",
    "retire_versions",
    "enable_principal",
    "set_control_policy",
)
KEY_KINDS = frozenset(
    {"grant", "set_escrow_policy", "set_xks_policy", "schedule_deletion", "retire_versions"}
)
# what hands out or restores a principal's power to use the keys it holds grants on
CREDENTIAL_KINDS = frozenset({"issue_sigv4", "issue_token", "enable_principal"})

PENDING, APPLIED, REJECTED, CANCELLED = "pending", "applied", "rejected", "cancelled"
STATES = (PENDING, APPLIED, REJECTED, CANCELLED)


@dataclass(frozen=True)
class ControlPolicy:
    """Which control-plane changes need approvals: under ``dual`` every change of KINDS
    needs ``quorum`` approvals by distinct custodians other than its proposer, with at
    least one from each of ``required_groups`` (and from each group that oversees what the
    change touches); a rejection by a member of such a group rejects it. A change expires
    ``ttl_seconds`` after it is proposed. ``single-operator``: changes apply at once
    (development only; shown on the dashboard and /readyz)."""

    mode: str = DUAL
    quorum: int = 2
    required_groups: frozenset[str] = frozenset()
    ttl_seconds: int = 7 * 86400
    mac: str = ""

    @property
    def dual(self) -> bool:
        return self.mode != SINGLE_OPERATOR

    def fields(self) -> dict[str, Any]:
        """What the policy's seal and its audit record cover."""
        return {
            "id": 1,
            "mode": self.mode,
            "quorum": self.quorum,
            "required_groups": sorted(self.required_groups),
            "ttl_seconds": self.ttl_seconds,
        }

    def summary(self) -> str:
        groups = ",".join(sorted(self.required_groups)) or "-"
        return f"mode={self.mode} quorum={self.quorum} groups={groups} ttl={self.ttl_seconds}"


@dataclass(frozen=True)
class Change:
    change_id: str
    kind: str
    params_json: str  # canonical JSON (kms/formats/change.py)
    proposer: str
    created_at: str
    expires_at: str
    digest: str  # hex
    state: str
    mac: str = ""

    @property
    def params(self) -> dict[str, Any]:
        """The arguments ({} for a stored text that is no JSON object: the digest then
        fails, so such a row is never used)."""
        try:
            value = json.loads(self.params_json)
        except (ValueError, RecursionError):
            return {}
        return value if isinstance(value, dict) else {}

    def signed_fields(self) -> dict[str, Any]:
        """The fields the digest covers, as stored."""
        return {
            "change_id": self.change_id,
            "kind": self.kind,
            "params": self.params,
            "proposer": self.proposer,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }


@dataclass(frozen=True)
class ChangeDecision:
    custodian: str
    decision: str  # approve | reject
    signature: bytes
    recorded_at: str


class ChangeRows(Protocol):
    """The control policy, proposed changes and their decisions
    (kms/backends/storage/change_tx.py)."""

    def control_policy(self) -> ControlPolicy | None:
        """The pinned policy (locked until the transaction ends), None if none is."""

    def put_control_policy(self, policy: ControlPolicy, new: bool) -> None: ...
    def add_change(self, change: Change) -> None: ...
    def update_change(self, change: Change) -> None: ...
    def change(self, change_id: str) -> Change | None:
        """The change, locked until the transaction ends."""

    def list_changes(self, states: list[str], limit: int) -> list[Change]: ...
    def add_change_decision(self, change_id: str, decision: ChangeDecision) -> None:
        """Conflict if that custodian already decided on the change."""

    def change_decisions(self, change_id: str) -> list[ChangeDecision]: ...
    def granted_keys(self, principal_id: int) -> list[str]: ...
