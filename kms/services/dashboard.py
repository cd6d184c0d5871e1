"""What the ops dashboard reads and records: one audited operation per page, login and
logout records, CSRF refusals, and "verify now" of the live audit chain. (The actions on
keys and principals are the services' own methods, with their own records.)

Like every read in this service, a page read that is refused (wrong role, unknown key)
leaves an audit record; a successful read does not. Logins of admins and auditors, logins
refused for their role, logouts, CSRF refusals and verifications are chained. A login
with an unknown token is logged, not chained: it names no principal, and chaining it
would let anyone grow the audit trail (kms/api/errors.py does the same).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from kms.errors import ClientError, Forbidden, NotFound
from kms.services.audit import MAX_PAGE, AuditTrail
from kms.services.audit_events import Caller, format_time
from kms.services.audit_export import AuditExports
from kms.services.audit_verify import Report, VerifyInputError, verify_bundle
from kms.services.escrow_common import EscrowRows
from kms.services.hsm_port import Hsm
from kms.services.key_refs import resolve
from kms.services.keys import KeyService
from kms.services.model import (
    OPEN_CASE_STATES,
    AuditHead,
    AuditQuery,
    EscrowCase,
    Key,
    KeyUsage,
    Principal,
    Role,
    Token,
)
from kms.services.ports import (
    AuditRows,
    CaseRows,
    Clock,
    KeyRows,
    PrincipalRows,
    SealRows,
    Store,
)
from kms.services.principals import NAME_RE, PrincipalService
from kms.services.rotation import is_overdue, next_rotation

DASHBOARD_ROLES = (Role.ADMIN, Role.AUDITOR)
SESSION_KEY_LABEL = b"kms-dashboard-session-v1"
REFUSED = "refused"  # audit view filter: every outcome but "ok"
MAX_AUDIT_ROWS = 500
VERIFY_FAILED = "audit_verification_failed"


class CsrfRefused(ClientError):
    """A state-changing form came without the session's CSRF token."""

    code = "csrf_invalid"
    public_message = "invalid or missing CSRF token; nothing was changed"


@dataclass(frozen=True)
class KeyRow:
    """A key as the dashboard lists it."""

    key: Key
    age: timedelta  # of the current version
    next_rotation: datetime | None
    overdue: bool


@dataclass(frozen=True)
class CaseRow:
    case_id: str
    state: str
    requester: str
    created_at: str
    expires_at: str
    expired: bool  # expiry passed; the case settles to expired at its next use
    sealed: bool  # the row still carries its HSM seal


@dataclass(frozen=True)
class AuditStatus:
    head_seq: int
    archived_seq: int
    last_record: dict[str, Any] | None
    last_checkpoint: dict[str, Any] | None
    last_verification: dict[str, Any] | None


@dataclass(frozen=True)
class Overview:
    now: datetime
    keys: list[KeyRow]
    audit: AuditStatus
    cases: list[CaseRow]


@dataclass(frozen=True)
class KeyDetail:
    row: KeyRow
    usage: KeyUsage


@dataclass(frozen=True)
class AuditPage:
    records: list[dict[str, Any]]  # newest first
    aliases: dict[str, str]  # key_id -> alias
    key_id: str | None  # the key filter, resolved


@dataclass(frozen=True)
class PrincipalDetail:
    principal: Principal
    tokens: list[Token]  # oldest first, expired ones too; never a token itself, only its id


@dataclass(frozen=True)
class Verification:
    ok: bool
    summary: str


class DashboardTx(PrincipalRows, KeyRows, CaseRows, AuditRows, SealRows, Protocol):
    """The rows DashboardService reads."""


class DashboardService:
    def __init__(
        self,
        storage: Store[DashboardTx],
        hsm: Hsm,
        trail: AuditTrail,
        principals: PrincipalService,
        keys: KeyService,
        exports: AuditExports,
        clock: Clock,
        rows: EscrowRows,
    ) -> None:
        self._storage = storage
        self._hsm = hsm
        self._trail = trail
        self._principals = principals
        self._keys = keys
        self._exports = exports
        self._clock = clock
        self._rows = rows  # the worker's sealed escrow rows (one memo of verified rows)

    def now(self) -> datetime:
        return self._clock.now()

    def session_secret(self) -> bytes:
        """The key that signs dashboard session cookies: an HMAC made inside the HSM, so
        every worker and node sharing the token derives the same one and none is stored."""
        return self._hsm.mac(SESSION_KEY_LABEL)

    # -- sessions ---------------------------------------------------------------------------

    def login(self, request_id: str, token: str) -> tuple[Principal, str]:
        """The principal holding ``token`` if it is an admin or auditor (recorded), with
        the token's id (the session lives only as long as the token); Unauthenticated for
        an unknown, expired or disabled token, Forbidden (recorded) for another role."""
        principal, found = self._principals.authenticate_token(token or None)
        caller = Caller(request_id, principal)
        with self._trail.operation(caller, "dashboard_login") as op:
            caller.require(*DASHBOARD_ROLES)
            detail = f"role={principal.role.value} token={found.token_id}"
            self._trail.record([op.ok(detail=detail)])
        return principal, found.token_id

    def resume(self, name: str, role: str, token_id: str, login_at: float) -> Principal | None:
        """The principal a session names, if it still exists, enabled, with that
        dashboard role, the token it logged in with is neither revoked nor expired, and
        its sessions were not ended after ``login_at`` (unix seconds); None otherwise
        (the session is then worthless). Read on every request: server-side revocation
        takes effect at the next click."""
        now = self._clock.now()
        with self._storage.reader() as tx:
            principal = tx.principal_by_name(name)
            if principal is None or principal.disabled or principal.role.value != role:
                return None
            tokens = [tok for _, tok in tx.tokens_of(principal.id) if tok.token_id == token_id]
        if not tokens or tokens[0].expired(now) or principal.role not in DASHBOARD_ROLES:
            return None
        ended = principal.sessions_since
        return None if ended is not None and login_at <= ended.timestamp() else principal

    def logout(self, caller: Caller) -> None:
        with self._trail.operation(caller, "dashboard_logout") as op:
            self._trail.record([op.ok()])

    # -- pages ------------------------------------------------------------------------------

    def overview(self, caller: Caller) -> Overview:
        """Every key with its rotation status, the audit status, open escrow cases."""
        with self._trail.operation(caller, "dashboard_overview"):
            caller.require(*DASHBOARD_ROLES)
            now = self._clock.now()
            with self._storage.reader() as tx:
                keys = tx.list_keys()
                head = tx.audit_head()
                status = _audit_status(tx, head)
                cases = tx.list_cases(sorted(OPEN_CASE_STATES))
                sealed = {c.case_id: self._sealed_case(tx, c) for c in cases}
            stamp = format_time(now)
            return Overview(
                now,
                [key_row(k, now) for k in keys],
                status,
                [
                    CaseRow(
                        c.case_id,
                        c.state.value,
                        c.requester,
                        c.created_at,
                        c.expires_at,
                        expired=stamp >= c.expires_at,
                        sealed=sealed[c.case_id],
                    )
                    for c in cases
                ],
            )

    def _sealed_case(self, tx: DashboardTx, case: EscrowCase) -> bool:
        """Whether the case row carries its current HSM seal (not an older copy)."""
        try:
            return self._rows.case(tx, case.case_id) is not None
        except Forbidden:
            return False

    def key_detail(self, caller: Caller, ref: str, days: int = 30) -> KeyDetail:
        """One key: rotation status, versions with their use, use per day and version."""
        with self._trail.operation(caller, "dashboard_key") as op:
            caller.require(*DASHBOARD_ROLES)
            usage = self._keys.usage(caller, ref, days)
            op.note(key_id=usage.key.key_id)
            return KeyDetail(key_row(usage.key, self._clock.now()), usage)

    def audit_page(
        self, caller: Caller, key_ref: str | None, outcome: str | None, limit: int = 100
    ) -> AuditPage:
        """The newest ``limit`` records, newest first, optionally of one key and of one
        outcome (``"refused"``: every outcome but ok)."""
        with self._trail.operation(caller, "dashboard_audit"):
            caller.require(*DASHBOARD_ROLES)
            limit = max(1, min(limit, MAX_AUDIT_ROWS))
            with self._storage.reader() as tx:
                key_id = None
                if key_ref:
                    key_id = resolve(tx, key_ref).key_id
                query = AuditQuery(
                    key_id=key_id, outcome=None if outcome in (None, REFUSED) else outcome
                )
                records = newest(
                    tx, tx.audit_head(), query, limit, _refused if outcome == REFUSED else None
                )
                aliases = {k.key_id: k.alias for k in tx.list_keys() if k.alias}
            return AuditPage(records, aliases, key_id)

    def principals(self, caller: Caller) -> list[Principal]:
        """Every principal (enabled or not) whose row verifies its seal; for auditors too,
        who may not use PrincipalService's admin listing."""
        with self._trail.operation(caller, "dashboard_principals"):
            caller.require(*DASHBOARD_ROLES)
            with self._storage.reader() as tx:
                return tx.list_principals()

    def principal_detail(self, caller: Caller, name: str) -> PrincipalDetail:
        """One principal with the ids and times of its tokens; NotFound if there is none
        of that name."""
        with self._trail.operation(caller, "dashboard_principal"):
            caller.require(*DASHBOARD_ROLES)
            with self._storage.reader() as tx:
                principal = tx.principal_by_name(name) if NAME_RE.fullmatch(name) else None
                if principal is None:
                    raise NotFound(f"no principal named {name!r}")
                tokens = [tok for _, tok in tx.tokens_of(principal.id)]
            return PrincipalDetail(principal, tokens)

    # -- actions ----------------------------------------------------------------------------

    def verify(self, caller: Caller) -> Verification:
        """Verify the live chain (from the archived prefix to the head) and its checkpoint
        signatures with the offline verifier, against this HSM's audit key; record the
        result as ``verify_audit`` (outcome ok or audit_verification_failed)."""
        with self._trail.operation(caller, "verify_audit") as op:
            caller.require(*DASHBOARD_ROLES)
            with self._storage.reader() as tx:
                archived = tx.audit_head().archived_seq
                anchor = tx.checkpoints(archived - 1, archived, 1) if archived else []
            lines = self._exports.export(caller, None, None)
            try:
                report = verify_bundle(
                    lines, self._trail.public_key_pem(), anchor[0] if anchor else None
                )
            except VerifyInputError as e:
                result = Verification(False, f"cannot verify: {e}")
            else:
                result = Verification(report.ok, _summary(report))
            self._trail.record(
                [
                    op.ok(detail=result.summary)
                    if result.ok
                    else op.failed(VERIFY_FAILED, result.summary)
                ]
            )
            return result


def key_row(key: Key, now: datetime) -> KeyRow:
    made = key.rotated_at or key.created_at
    return KeyRow(
        key,
        max(now - made, timedelta(0)),
        next_rotation(key),
        is_overdue(key, now),
    )


def newest(
    tx: AuditRows,
    head: AuditHead,
    query: AuditQuery,
    limit: int,
    keep: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` records matching ``query`` (and ``keep``, a predicate), newest
    first. Reads windows of growing size back from the head, so a recent match costs a
    small read and an absent one at most a few passes over the chain."""
    found: list[dict[str, Any]] = []
    until, window = head.seq, 256
    while until > head.archived_seq and len(found) < limit:
        after = max(head.archived_seq, until - window)
        tail: deque[dict[str, Any]] = deque(maxlen=limit - len(found))
        cursor = after
        while True:
            page = tx.audit_records(cursor, MAX_PAGE, until=until, query=query)
            tail.extend(r for r in page if keep is None or keep(r))
            if len(page) < MAX_PAGE:
                break
            cursor = page[-1]["seq"]
        found.extend(reversed(tail))
        until, window = after, window * 8
    return found


def _refused(record: dict[str, Any]) -> bool:
    return bool(record["outcome"] != "ok")


def _audit_status(tx: AuditRows, head: AuditHead) -> AuditStatus:
    last = tx.audit_records(head.seq - 1, 1) if head.seq > head.archived_seq else []
    cp = tx.checkpoints(head.checkpoint_seq - 1, head.checkpoint_seq, 1)
    verified = newest(tx, head, AuditQuery(operation="verify_audit"), 1)
    return AuditStatus(
        head.seq,
        head.archived_seq,
        last[0] if last else None,
        cp[0] if head.checkpoint_seq and cp else None,
        verified[0] if verified else None,
    )


def _summary(report: Report) -> str:
    """One line for the audit record's detail and the page (the trail cuts it at 256)."""
    if not report.ok:
        more = len(report.errors) - 1
        return f"FAILED: {report.errors[0]}" + (f" (+{more} more)" if more else "")
    chain = f"seq {report.first_seq}..{report.last_seq}" if report.last_seq is not None else "empty"
    signed = f", the last at seq {report.last_signed_seq}" if report.last_signed_seq else ""
    return (
        f"{_n(report.records, 'record')} ({chain}), "
        f"{_n(report.checkpoints_verified, 'signed checkpoint')}{signed}, "
        f"{_n(report.unsigned_tail, 'record')} after the last checkpoint"
    )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
