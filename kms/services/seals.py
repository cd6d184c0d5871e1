"""HSM seals on the database rows that grant or describe access.

A seal is an HMAC-SHA256 made inside the HSM with its integrity key, hex-encoded, over::

    b"KMS-ROW-1\\n" || kind || b"\\n" || canonical JSON of the row's sealed fields

(canonical JSON: keys sorted, no whitespace, ASCII). The fields name the row (its key
columns) as well as its content, so a seal copied onto another row does not verify. The
sealed fields of each kind are the functions below; the storage layer seals every row it
writes and checks every row it reads (kms/backends/storage/*_tx.py), the escrow rows use
the same seals (kms/services/escrow_common.py).

Whoever writes the database cannot make a seal: a row inserted or edited there (a minted
principal, token or grant, a revived key) fails its check, is never used, and the caller
gets the generic refusal of SealBroken while the audit trail, a metric and an error log
line get the precise reason. A seal alone does not say whether the row is the newest
one; each transaction's TxSeals also checks that a row's seal is the current one, which
the HSM anchors (kms/services/state_index.py), so an older sealed copy is refused too.

Checking is on the hot path, so a process remembers the rows it verified (bounded): a
row read again costs the JSON encoding and a dictionary lookup, not an HSM call.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from kms.errors import SealBroken
from kms.formats import state as state_fmt
from kms.formats.xks import XksKeyPolicy
from kms.metrics import SEAL_FAILURES
from kms.services.audit import AuditTrail
from kms.services.audit_events import local_event
from kms.services.hsm_port import Hsm
from kms.services.model import (
    LEGACY_WRAP_MECHANISM,
    Grant,
    Key,
    KeyVersion,
    Principal,
    SigV4Credential,
)
from kms.services.ports import SealRows, Store, Tx
from kms.services.ports import TxSeals as TxSealsPort
from kms.services.state_index import StateIndex

log = logging.getLogger("kms.seals")
T = TypeVar("T")
_SEAL = re.compile(r"[0-9a-f]{64}")
MEMO_SIZE = 200_000  # verified rows remembered per process (~150 bytes each)


class RowSeals:
    """The seals of one process; with ``follow(storage)`` they are also checked for
    freshness against the HSM state anchor (kms/services/state_index.py)."""

    def __init__(self, hsm: Hsm, memo_size: int = MEMO_SIZE) -> None:
        self._hsm = hsm
        self._memo: OrderedDict[bytes, None] = OrderedDict()
        self._memo_size = memo_size
        self.state: StateIndex | None = None

    def follow(self, storage: Store[Tx]) -> None:
        """Check freshness of the rows of ``storage`` from now on (called by the storage
        these seals are given to)."""
        self.state = StateIndex(self._hsm, storage)

    def begin(self) -> TxSeals:
        """The seals of one transaction."""
        return TxSeals(self, self.state)

    def commit(self, tx: SealRows, seals: TxSealsPort) -> Callable[[bool], None] | None:
        """Before ``tx`` commits: log its sealed writes and move the HSM state anchor
        (StateIndex.record); what to call after the commit, if anything."""
        if self.state is None or not seals.written:
            return None
        return self.state.record(tx, seals.written)

    def seal(self, kind: str, fields: Mapping[str, Any]) -> str:
        """The seal of a row of ``kind`` with ``fields`` (HsmUnavailable if the HSM is
        down: nothing is written unsealed)."""
        return self._hsm.mac(_message(kind, fields)).hex()

    def check(self, kind: str, fields: Mapping[str, Any], seal: object) -> None:
        """Return only if ``seal`` is the seal of these fields; SealBroken otherwise
        (an unsealed row, NULL, or a seal that is not 64 hex digits is broken too)."""
        ident = ",".join(str(fields[k]) for k in _IDENTITY[kind])
        if seal is None:
            raise broken(kind, f"the {kind} row {ident} is unsealed")
        if not isinstance(seal, str) or not _SEAL.fullmatch(seal):
            raise broken(kind, f"the seal of the {kind} row {ident} is malformed")
        message = _message(kind, fields)
        memo_key = message + b"\n" + seal.encode("ascii")
        if memo_key in self._memo:
            self._memo.move_to_end(memo_key)
            return
        if not hmac.compare_digest(self._hsm.mac(message).hex(), seal):
            raise broken(kind, f"the seal of the {kind} row {ident} does not verify")
        self._memo[memo_key] = None
        if len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)


class TxSeals:
    """The seals of one transaction: what it wrote (logged at commit), and the freshness
    check of what it reads (the anchor is followed before its first sealed row)."""

    def __init__(self, seals: RowSeals, state: StateIndex | None) -> None:
        self._seals = seals
        self._state = state
        self.written: dict[tuple[str, str], str | None] = {}
        self._followed = False  # the HSM state anchor was read in this transaction

    def seal(self, kind: str, fields: Mapping[str, Any]) -> str:
        seal = self._seals.seal(kind, fields)
        self.written[(kind, row_ident(kind, fields))] = seal
        return seal

    def wrote(self, kind: str, ident: str, seal: str | None) -> None:
        """Note a row this transaction wrote with ``seal`` (None: deleted) sealed by the
        service layer (the escrow rows)."""
        self.written[(kind, ident)] = seal

    def check(self, kind: str, fields: Mapping[str, Any], seal: object) -> None:
        """Return only if ``seal`` seals ``fields`` and is the row's current seal."""
        self._seals.check(kind, fields, seal)
        self.current(kind, row_ident(kind, fields), str(seal))

    def current(self, kind: str, ident: str, seal: str) -> None:
        """SealBroken unless ``seal`` is the current seal of row (kind, ident): this
        transaction's own write, or the HSM-anchored state's."""
        if (kind, ident) in self.written:
            if self.written[(kind, ident)] == seal:
                return
        elif self._state is None or self._state.require(kind, ident, seal, self._follow()):
            return
        raise broken(
            kind, f"the {kind} row {_named(kind, ident)} is an older sealed copy: rolled back"
        )

    def absent(self, kind: str, ident: str) -> None:
        """SealBroken if row (kind, ident) was not found but the anchored state has it
        (deleted in the database, where its absence means something more permissive)."""
        if (kind, ident) in self.written or self._state is None:
            return
        if self._state.holds(kind, ident, self._follow()):
            raise broken(
                kind, f"the {kind} row {_named(kind, ident)} was deleted from the database"
            )

    def _follow(self) -> bool:
        """True the first time a transaction asks (it reads the HSM anchor then)."""
        first, self._followed = not self._followed, True
        return first

    def complete(self, kind: str, found: set[str]) -> None:
        """SealBroken if a current row of ``kind`` is missing from ``found`` (a listing
        from which a row was deleted in the database)."""
        if self._state is None:
            return
        gone = {i for (k, i), s in self.written.items() if k == kind and s is None}
        missing = self._state.idents(kind) - found - gone
        if missing:
            names = ", ".join(sorted(_named(kind, i) for i in missing))
            raise broken(kind, f"the {kind} rows {names} were deleted from the database")


def _named(kind: str, ident: str) -> str:
    """A row's ident for a message: its key columns, never a token's hash."""
    if kind == "token":
        return "of this request"
    return ",".join(str(v) for v in json.loads(ident))


def broken(kind: str, reason: str) -> SealBroken:
    """The refusal of a row that is not the server's (counted and logged as an alarm)."""
    SEAL_FAILURES.labels(kind).inc()
    log.error("database row fails its HSM seal; not used", extra={"detail": reason})
    return SealBroken(detail=reason)


def parsed(kind: str, ident: object, parse: Callable[[], T]) -> T:
    """``parse()`` of a row, or SealBroken if the row does not even parse (a value no
    server writes: it was written in the database), never a 500."""
    try:
        return parse()
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise broken(kind, f"the {kind} row {ident} is malformed: {type(e).__name__}") from e


def _message(kind: str, fields: Mapping[str, Any]) -> bytes:
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"KMS-ROW-1\n{kind}\n{text}".encode("ascii")


def _time(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the sealed fields of each kind -----------------------------------------------------


def row_ident(kind: str, fields: Mapping[str, Any]) -> str:
    """The row's identity in the sealed state (kms/formats/state.py): its key columns."""
    return state_fmt.ident(fields[k] for k in ROW_KEY[kind])


# the key columns of each kind (kms/backends/storage/state_tx.py SEALED_TABLES)
ROW_KEY = {
    "principal": ("id",),
    "token": ("token_sha256",),
    "key": ("key_id",),
    "key_version": ("key_id", "version"),
    "grant": ("key_id", "principal_id"),
    "sigv4_credential": ("access_key_id",),
    "xks_policy": ("key_id",),
    "custodian": ("name",),
    "case": ("case_id",),
    "change": ("change_id",),
    "control_policy": ("id",),
}

_IDENTITY = {
    "principal": ("id", "name"),
    "token": ("principal_id",),
    "grant": ("key_id", "principal_id"),
    "key": ("key_id",),
    "key_version": ("key_id", "version"),
    "sigv4_credential": ("access_key_id",),
    "xks_policy": ("key_id",),
    "custodian": ("name",),
    "case": ("case_id",),
    "change": ("change_id",),
    "control_policy": ("id",),
}


def principal_fields(p: Principal) -> dict[str, Any]:
    """Identity and role; the lifecycle fields only once set, so that rows sealed before
    they existed keep their seals (and an edit that clears one breaks the seal)."""
    fields: dict[str, Any] = {"id": p.id, "name": p.name, "role": p.role.value}
    if p.disabled_at is not None:
        fields["disabled_at"] = _time(p.disabled_at)
    if p.sessions_since is not None:
        fields["sessions_since"] = _time(p.sessions_since)
    return fields


def token_fields(
    token_sha256: str,
    principal_id: int,
    expires_at: datetime | None = None,
    rotated_at: datetime | None = None,
) -> dict[str, Any]:
    """The token's hash, its principal and, once set, its expiry and the time a rotation
    replaced it (see principal_fields)."""
    fields: dict[str, Any] = {"token_sha256": token_sha256, "principal_id": principal_id}
    if expires_at is not None:
        fields["expires_at"] = _time(expires_at)
    if rotated_at is not None:
        fields["rotated_at"] = _time(rotated_at)
    return fields


def grant_fields(key_id: str, principal_id: int, grant: Grant) -> dict[str, Any]:
    return {
        "key_id": key_id,
        "principal_id": principal_id,
        "operations": sorted(grant.operations),
        "justifications": sorted(grant.justifications),
    }


def key_fields(key: Key) -> dict[str, Any]:
    """Everything that decides how a key may be used or when it rotates (not its
    description or alias)."""
    policy = key.escrow_policy
    return {
        "key_id": key.key_id,
        "state": key.state.value,
        "current_version": key.current_version,
        "min_decryption_version": key.min_decryption_version,
        "deletion_date": _time(key.deletion_date),
        "rotation_period_days": key.rotation_period_days,
        "rotated_at": _time(key.rotated_at),
        "escrow_policy": None
        if policy is None
        else {
            "quorum": policy.quorum,
            "required_groups": sorted(policy.required_groups),
            "veto_groups": sorted(policy.veto_groups),
        },
    }


def version_fields(v: KeyVersion) -> dict[str, Any]:
    """A KEK version and the identity of its wrapped material (and of the mechanism that
    wrapped it: see _with_mechanism)."""
    fields = {
        "key_id": v.key_id,
        "version": v.version,
        "wrapped_sha256": _sha256(v.wrapped),
        "root_label": v.root_label,
    }
    return _with_mechanism(fields, v.wrap_mechanism)


def xks_policy_fields(key_id: str, policy: XksKeyPolicy) -> dict[str, Any]:
    return {
        "key_id": key_id,
        "usage": sorted(policy.usage),
        "aws_principals": None if policy.aws_principals is None else list(policy.aws_principals),
        "kms_operations": None if policy.kms_operations is None else list(policy.kms_operations),
    }


def sigv4_fields(c: SigV4Credential) -> dict[str, Any]:
    fields = {
        "access_key_id": c.access_key_id,
        "principal_id": c.principal.id,
        "state": c.state,
        "sealed_secret_sha256": _sha256(c.sealed_secret),
        "wrapped_kek_sha256": _sha256(c.wrapped_kek),
        "root_label": c.root_label,
    }
    return _with_mechanism(fields, c.wrap_mechanism)


def _with_mechanism(fields: dict[str, Any], mechanism: str) -> dict[str, Any]:
    """``fields`` with ``"wrap_mechanism"`` added unless ``mechanism`` is the legacy one.

    Every row sealed before mechanisms were recorded (migration 0013) holds a KEK wrapped
    with LEGACY_WRAP_MECHANISM and a seal over the fields without this one: leaving the
    field out for that value keeps those seals valid, with no re-sealing. The mechanism is
    still covered both ways: a database writer who changes a legacy row's mechanism adds
    the field to what is checked, one who sets a recorded mechanism back to the legacy
    value removes it, and either way the seal no longer verifies."""
    if mechanism == LEGACY_WRAP_MECHANISM:
        return fields
    return {**fields, "wrap_mechanism": mechanism}


def seal_unsealed_rows(storage: Store[Tx], trail: AuditTrail) -> dict[str, int]:
    """``kms init`` / ``kms migrate``: seal the rows a database made before row seals
    existed, trusting them as found, and record how many of each kind in the audit
    trail (nothing is recorded when every row was sealed already)."""
    with storage.transaction() as tx:
        counts = tx.seal_unsealed()
        if counts:
            detail = "sealed rows as found: " + " ".join(
                f"{k}={n}" for k, n in sorted(counts.items())
            )
            trail.append(tx, [local_event("seal_unsealed_rows", detail)])
    return counts
