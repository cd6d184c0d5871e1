"""The parameters of key management requests and their limits: description length, the
pending-deletion window, the rotation period, ``min_decryption_version`` moves, escrow
quorums, and the operations and justifications a grant may hold.

Every check here is pure (no storage, no HSM): ``KeyService`` (kms/services/keys.py) runs
it before it changes anything, so a refused request leaves no trace but its audit record.
"""

from __future__ import annotations

from kms.errors import InvalidRequest
from kms.services.model import (
    DEFAULT_JUSTIFICATION,
    ESCROW_ONLY_JUSTIFICATIONS,
    JUSTIFICATIONS,
    EscrowPolicy,
    Grant,
    Key,
)
from kms.services.model import Permission as GrantOp

MAX_DESCRIPTION = 1024
MIN_PENDING_DAYS, MAX_PENDING_DAYS = 7, 30
MIN_ROTATION_DAYS, MAX_ROTATION_DAYS = 1, 3650
MIN_QUORUM, MAX_QUORUM = 1, 16


class Unset:
    """Marks an argument that was not given (None is a value: "turn off")."""


UNSET = Unset()


def check_description(description: str) -> None:
    """InvalidRequest if the description is longer than MAX_DESCRIPTION."""
    if len(description) > MAX_DESCRIPTION:
        raise InvalidRequest(f"description must be at most {MAX_DESCRIPTION} characters")


def check_pending_days(pending_days: int) -> None:
    """InvalidRequest unless the deletion window is MIN_PENDING_DAYS..MAX_PENDING_DAYS."""
    if not MIN_PENDING_DAYS <= pending_days <= MAX_PENDING_DAYS:
        raise InvalidRequest(
            f"pending_days must be between {MIN_PENDING_DAYS} and {MAX_PENDING_DAYS}"
        )


def check_rotation_period(days: int | Unset | None) -> None:
    """InvalidRequest unless a given period is MIN_ROTATION_DAYS..MAX_ROTATION_DAYS (None,
    scheduled rotation off, and UNSET, no change, always pass)."""
    if isinstance(days, int) and not MIN_ROTATION_DAYS <= days <= MAX_ROTATION_DAYS:
        raise InvalidRequest(
            f"rotation_period_days must be between {MIN_ROTATION_DAYS} and "
            f"{MAX_ROTATION_DAYS}, or null to turn scheduled rotation off"
        )


def check_min_version(key: Key, version: int) -> None:
    """InvalidRequest unless ``version`` keeps the key's invariant
    ``min_decryption_version <= current_version`` and does not move backwards: a retired
    version never becomes usable again."""
    if version < key.min_decryption_version:
        raise InvalidRequest(
            f"min_decryption_version only moves forward (it is {key.min_decryption_version})"
        )
    if version > key.current_version:
        raise InvalidRequest(
            f"min_decryption_version cannot pass the current version ({key.current_version})"
        )


def check_escrow_policy(policy: EscrowPolicy) -> None:
    """InvalidRequest unless the quorum is MIN_QUORUM..MAX_QUORUM and can be met with one
    approval from each required group (so the policy is satisfiable)."""
    if not MIN_QUORUM <= policy.quorum <= MAX_QUORUM:
        raise InvalidRequest(f"quorum must be between {MIN_QUORUM} and {MAX_QUORUM}")
    if policy.quorum < len(policy.required_groups):
        raise InvalidRequest("quorum must be at least the number of required groups")


def parse_grant(operations: list[str], justifications: list[str] | None) -> Grant:
    """The grant of ``operations`` (empty: revoked) with ``justifications`` (None: the
    default, service_processing); InvalidRequest for a name outside either vocabulary."""
    return Grant(parse_operations(operations), parse_grant_justifications(justifications))


def parse_operations(values: list[str]) -> frozenset[str]:
    """The operations named, each a grant operation (kms.services.model.Permission)."""
    allowed = {o.value for o in GrantOp}
    bad = [v for v in values if v not in allowed]
    if bad:
        raise InvalidRequest("operations must be among: " + ", ".join(sorted(allowed)))
    return frozenset(values)


def parse_grant_justifications(values: list[str] | None) -> frozenset[str]:
    """The justifications named (None: the default). Never legal_request or break_glass:
    those open key material only under an approved escrow case, never through a grant."""
    if values is None:
        return frozenset({DEFAULT_JUSTIFICATION})
    bad = [v for v in values if v not in JUSTIFICATIONS]
    if bad or not values:
        raise InvalidRequest("justifications must be among: " + ", ".join(sorted(JUSTIFICATIONS)))
    if set(values) & ESCROW_ONLY_JUSTIFICATIONS:
        raise InvalidRequest(
            "legal_request and break_glass are never granted; they need an escrow case"
        )
    return frozenset(values)
