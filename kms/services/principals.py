"""Principals, their bearer tokens and their lifecycle.

A token is 32 random bytes (base64url) behind a ``kms_`` prefix. Only its SHA-256 is
stored; a token is found by the hash of what the caller presents, so the secret itself is
never compared, stored or logged. A token is shown once, when it is issued. A principal
may hold several tokens (a rotation keeps the old one for a grace period); each may
expire (``KMS_TOKEN_MAX_LIFETIME`` caps it per role), and is listed by its id, the
first 16 hex digits of its SHA-256.

A disabled principal is refused on every face: its tokens here, its certificate
(``by_certificate_name``), its SigV4 credentials (kms/services/sigv4.py), its dashboard
sessions (kms/services/dashboard.py) and, inside the transaction that records each key
use, the key-use pipeline (kms/services/key_work.py). Workers remember a successful
look-up for ``cache_seconds`` only while the HSM state anchor has not moved
(kms/services/state_index.py): every lifecycle change moves it, so it takes effect at
once on every worker and node.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from kms.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    SealBroken,
    Unauthenticated,
)
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller, EventBuilder
from kms.services.change_quorum import ChangeTx
from kms.services.changes import ChangeService
from kms.services.model import Principal, Role, Token
from kms.services.ports import Clock, PrincipalRows, Store
from kms.services.state_cache import HSM_DOWN, cache_version, still_valid
from kms.services.tokens import (
    MAX_GRACE_SECONDS,
    MAX_TOKEN_CHARS,
    MAX_TTL_SECONDS,
    TOKEN_PREFIX,
    check_token_id,
    expiry_note,
    hash_of,
    new_token,
    token_hash,
    token_of,
)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
AUTH_CACHE_SIZE = 10_000
TOKEN_USE_RESOLUTION = 60.0  # seconds between two notes of a token's last use
# roles whose creation is a dual-control change: they reach plaintext, or administer
PLAINTEXT_ROLES = frozenset({Role.SERVICE, Role.REQUESTER, Role.ADMIN})


class PrincipalServiceTx(ChangeTx, Protocol):
    """The rows PrincipalService reads and writes."""


Holder = tuple[Principal, Token | None]  # a token's principal and token; a name's: no token


class PrincipalService:
    def __init__(
        self,
        storage: Store[PrincipalServiceTx],
        audit: AuditTrail,
        clock: Clock,
        cache_seconds: float = 0.0,
        state_version: Callable[[], int | None] = lambda: None,
        max_lifetimes: Mapping[Role, int] | None = None,
        needed: Callable[[Any, str], str | None] = lambda tx, name: None,
        *,
        changes: ChangeService,
    ) -> None:
        self._storage = storage
        self._audit = audit
        self._clock = clock
        # look-up key -> (holder, monotonic expiry, state anchor it was read at)
        self._cache: OrderedDict[str, tuple[Holder, float, int]] = OrderedDict()
        self._cache_seconds = cache_seconds
        self._state_version = state_version
        self._max_lifetimes = dict(max_lifetimes or {})
        # why principal ``name`` must not be cut off (the last active custodian of a group
        # an escrow policy needs: CustodianService.needed_member), or None
        self._needed = needed
        self._changes = changes  # dual control of creations and credentials (changes.py)
        self._used: dict[str, float] = {}  # token hash -> monotonic time of its last note
        self._lock = threading.Lock()

    # -- authentication -----------------------------------------------------------------

    def authenticate(self, token: str | None) -> Principal:
        """The enabled principal holding ``token``, unexpired; Unauthenticated for
        anything else (the audit record's detail says which)."""
        return self.authenticate_token(token)[0]

    def authenticate_token(self, token: str | None) -> tuple[Principal, Token]:
        """authenticate(), with the token as listed (its id binds dashboard sessions)."""
        if not token or len(token) > MAX_TOKEN_CHARS or not token.startswith(TOKEN_PREFIX):
            raise Unauthenticated()
        digest = token_hash(token)
        holder = self._remembered("token:" + digest, lambda tx: tx.token_holder(digest))
        found = None if holder is None else holder[1]
        if holder is None or found is None:
            raise Unauthenticated()
        principal = holder[0]
        now = self._clock.now()
        if found.expired(now):
            raise Unauthenticated(detail=f"token {found.token_id} expired")
        _enabled(principal)
        self._note_use(digest, now)
        return principal, found

    def by_certificate_name(self, name: str) -> Principal:
        """The enabled principal called ``name``, for a caller whose identity a verified
        client certificate already proves (its subject CN, kms/api/peer.py);
        Unauthenticated otherwise. Remembered like a token."""
        if not NAME_RE.fullmatch(name):
            raise Unauthenticated(detail="client certificate CN is not a principal name")
        holder = self._remembered("cn:" + name, lambda tx: _named(tx.principal_by_name(name)))
        if holder is None:
            raise Unauthenticated(detail="client certificate CN names no principal")
        return _enabled(holder[0])

    def _remembered(
        self, key: str, load: Callable[[PrincipalRows], Holder | None]
    ) -> Holder | None:
        """``load``'s result for ``key``; a hit is remembered for ``cache_seconds`` (per
        worker, at most AUTH_CACHE_SIZE entries) while the HSM state anchor stays where
        it was read, a miss never."""
        now = time.monotonic()
        # the anchor is read only for a cache to follow (StateRefused: none used)
        version = cache_version(self._state_version) if self._cache_seconds > 0 else None
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[1] > now and still_valid(hit[2], version):
                self._cache.move_to_end(key)
                return hit[0]
        try:
            with self._storage.reader() as tx:
                found = load(tx)
        except SealBroken as e:  # a row written outside the server: the generic refusal
            self._audit.record_alarm("authenticate", e)
            raise Unauthenticated(detail=e.detail) from e
        if found is not None and self._cache_seconds > 0 and version not in (None, HSM_DOWN):
            with self._lock:
                self._cache[key] = (found, now + self._cache_seconds, version)
                while len(self._cache) > AUTH_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return found

    def _note_use(self, digest: str, now: datetime) -> None:
        """Record the token's last use, at most once a minute per worker; informational
        (not sealed), so a failure to write it refuses nothing."""
        mono = time.monotonic()
        with self._lock:
            if mono - self._used.get(digest, -TOKEN_USE_RESOLUTION) < TOKEN_USE_RESOLUTION:
                return
            self._used[digest] = mono
            if len(self._used) > AUTH_CACHE_SIZE:
                self._used.clear()
        try:
            with self._storage.transaction() as tx:
                tx.touch_token(digest, now)
        except Exception:  # the note is informational
            with self._lock:
                self._used.pop(digest, None)

    # -- administration -----------------------------------------------------------------

    def create(
        self, caller: Caller, name: str, role: str, ttl_seconds: int | None = None
    ) -> tuple[Principal, str]:
        """Create a principal; returns it with its token (the only time it is visible)."""
        with self._audit.operation(caller, "create_principal") as op:
            caller.require(Role.ADMIN)
            parsed_role = _role(role)
            _check_name(name)
            now = self._clock.now()
            expires = self._expiry(parsed_role, now, ttl_seconds)
            op.note(detail=f"name={name} role={parsed_role.value}" + expiry_note(expires))
            gated = parsed_role in PLAINTEXT_ROLES
            params = {"name": name, "role": parsed_role.value, "ttl_seconds": ttl_seconds}
            if gated:
                self._changes.require(caller, "create_principal", params)
            token = new_token()
            with self._storage.transaction() as tx:
                if gated:
                    self._changes.consume(tx, caller, "create_principal", params)
                principal = tx.add_principal(name, parsed_role, token_hash(token), now, expires)
                self._audit.append(tx, [op.ok()])
            return principal, token

    def list_principals(self, caller: Caller) -> list[Principal]:
        with self._audit.operation(caller, "list_principals"):
            caller.require(Role.ADMIN)
            with self._storage.reader() as tx:
                return tx.list_principals()

    def set_enabled(self, caller: Caller, name: str, enabled: bool) -> Principal:
        """Enable or disable the principal ``name`` (an admin; never oneself, nor the
        last enabled admin). Disabling also ends its dashboard sessions, so enabling it
        again does not bring them back. Idempotent; recorded either way. Enabling a
        disabled principal undoes another admin's decision: a dual-control change."""
        with self._audit.operation(
            caller, "enable_principal" if enabled else "disable_principal"
        ) as op:
            admin = caller.require(Role.ADMIN)
            _check_name(name)
            op.note(detail=f"name={name}")
            if enabled:
                with self._storage.reader() as tx:
                    if _existing(tx, name).disabled:
                        self._changes.require(caller, "enable_principal", {"name": name})
            with self._storage.transaction() as tx:
                principal = _existing(tx, name)
                if enabled and principal.disabled:  # decided here: disabled in flight too
                    self._changes.consume(tx, caller, "enable_principal", {"name": name})
                if principal.id == admin.id:  # (enabling: only ever from a request in flight)
                    raise Conflict("an admin cannot disable or enable itself")
                if not enabled and not principal.disabled:
                    self._may_cut_off(tx, principal)
                if principal.disabled == enabled:
                    now = self._clock.now()
                    principal = (
                        replace(principal, disabled_at=None)
                        if enabled  # its dashboard sessions stay ended
                        else replace(
                            principal, disabled_at=now, sessions_since=_later(principal, now)
                        )
                    )
                    tx.update_principal(principal)
                self._audit.append(tx, [op.ok()])
            self._forget()
            return principal

    def end_sessions(self, caller: Caller, name: str) -> Principal:
        """End every dashboard session of ``name`` opened until now (an admin, or the
        principal itself)."""
        with self._audit.operation(caller, "end_sessions") as op:
            _check_name(name)
            _self_or_admin(caller, name)
            op.note(detail=f"name={name}")
            with self._storage.transaction() as tx:
                principal = _existing(tx, name)
                principal = replace(principal, sessions_since=_later(principal, self._clock.now()))
                tx.update_principal(principal)
                self._audit.append(tx, [op.ok()])
            return principal

    def tokens(self, caller: Caller, name: str) -> list[Token]:
        """The tokens of ``name``, oldest first (an admin, or the principal itself)."""
        with self._audit.operation(caller, "list_tokens") as op:
            _check_name(name)
            _self_or_admin(caller, name)
            op.note(detail=f"name={name}")
            with self._storage.reader() as tx:
                return [tok for _, tok in tx.tokens_of(_existing(tx, name).id)]

    def issue_token(
        self,
        caller: Caller,
        name: str,
        ttl_seconds: int | None = None,
        rotate: str | None = None,
        grace_seconds: int = 0,
    ) -> tuple[str, Token]:
        """Issue a new token to ``name`` (an admin; a principal may rotate its own);
        with ``rotate`` (a token id), that token then expires ``grace_seconds`` from now
        (or earlier, if it already would). Returns the new token (shown only here).

        Requesters and custodians only rotate their own: an admin holding a requester's
        token could unwrap under its cases, and one holding a custodian's could revoke
        the custodian's own token and silence its veto. A principal rotating its own
        token gets no later expiry than the old one had, and a token is rotated once."""
        with self._audit.operation(caller, "rotate_token" if rotate else "issue_token") as op:
            _check_name(name)
            if rotate is None:
                caller.require(Role.ADMIN)
            else:
                _self_or_admin(caller, name)
                check_token_id(rotate)
            if not 0 <= grace_seconds <= MAX_GRACE_SECONDS:
                raise InvalidRequest(f"grace_seconds must be 0 to {MAX_GRACE_SECONDS}")
            now = self._clock.now()
            gated = caller.name != name  # a credential of someone else
            params = {
                "name": name,
                "ttl_seconds": ttl_seconds,
                "rotate": rotate,
                "grace_seconds": grace_seconds,
            }
            if gated:
                self._changes.require(caller, "issue_token", params)
            token = new_token()
            digest = token_hash(token)
            with self._storage.transaction() as tx:
                if gated:
                    self._changes.consume(tx, caller, "issue_token", params)
                principal = _existing(tx, name)
                own = caller.principal is not None and caller.principal.id == principal.id
                if not own and principal.role in (Role.REQUESTER, Role.CUSTODIAN):
                    raise Forbidden(
                        f"a {principal.role.value}'s tokens are rotated only by itself",
                        detail=f"token of {principal.role.value} {name} asked by another",
                    )
                expires = self._expiry(principal.role, now, ttl_seconds)
                if rotate is not None:
                    old_hash, old = token_of(tx, principal, rotate)
                    if old.expired(now):
                        raise Conflict(f"token {rotate} has expired; issue a new one")
                    if old.rotated_at is not None:
                        raise Conflict(
                            f"token {rotate} was rotated already: rotate its successor, or "
                            "revoke this one"
                        )
                    if own and old.expires_at is not None:
                        expires = min(expires or old.expires_at, old.expires_at)
                note = f"name={name} token={digest[:16]}" + expiry_note(expires)
                if rotate is not None:
                    until = now + timedelta(seconds=grace_seconds)
                    if old.expires_at is not None and old.expires_at < until:
                        until = old.expires_at
                    tx.set_token_rotated(old_hash, principal.id, until, now)
                    note += f" replaces={rotate} until={until.isoformat()}"
                op.note(detail=note)
                tx.add_token(principal.id, digest, now, expires)
                self._audit.append(tx, [op.ok()])
            self._forget()
            return token, Token(digest[:16], principal.id, now, expires, None)

    def revoke_token(self, caller: Caller, name: str, token_id: str) -> None:
        """Revoke one token of ``name`` at once (an admin, or the principal itself)."""
        with self._audit.operation(caller, "revoke_token") as op:
            _check_name(name)
            _self_or_admin(caller, name)
            check_token_id(token_id)
            op.note(detail=f"name={name} token={token_id}")
            with self._storage.transaction() as tx:
                principal = _existing(tx, name)
                digest = hash_of(tx, principal, token_id)
                now = self._clock.now()
                live = [
                    t for h, t in tx.tokens_of(principal.id) if h != digest and not t.expired(now)
                ]
                if not live:  # its last working token
                    self._may_cut_off(tx, principal)
                tx.delete_token(digest, principal.id)
                self._audit.append(tx, [op.ok()])
            self._forget()

    def bootstrap_admin(self, name: str) -> str | None:
        """Create the first admin if the database has no principal yet; return its token
        (which does not expire: rotate it). Idempotent: None when principals exist."""
        _check_name(name)
        op = EventBuilder(Caller(request_id="kms-init", principal=None), "bootstrap_admin")
        with self._storage.transaction() as tx:
            if tx.principal_count():  # every row, sealed or not: never a second first admin
                return None
            token = new_token()
            tx.add_principal(name, Role.ADMIN, token_hash(token), self._clock.now())
            self._audit.append(tx, [op.ok(detail=f"name={name}")])
        return token

    def _expiry(self, role: Role, now: datetime, ttl_seconds: int | None) -> datetime | None:
        """When a token issued now to ``role`` expires: the requested lifetime, capped by
        the role's maximum (KMS_TOKEN_MAX_LIFETIME); None: never."""
        if ttl_seconds is not None and not 60 <= ttl_seconds <= MAX_TTL_SECONDS:
            raise InvalidRequest(f"ttl_seconds must be 60 to {MAX_TTL_SECONDS}")
        limits = [x for x in (ttl_seconds, self._max_lifetimes.get(role)) if x is not None]
        return now + timedelta(seconds=min(limits)) if limits else None

    def _may_cut_off(self, tx: PrincipalServiceTx, principal: Principal) -> None:
        """Conflict if ``principal`` must keep working: the last enabled admin (nobody
        could administer the server again), or the last active custodian of a group an
        escrow policy needs (its veto would be silenced: a custodian decides through its
        principal), or one without whom a quorum cannot be reached."""
        if principal.role is Role.ADMIN and not any(
            p.role is Role.ADMIN and not p.disabled and p.id != principal.id
            for p in tx.list_principals()
        ):
            raise Conflict("the last enabled admin cannot be cut off")
        why = self._needed(tx, principal.name)
        if why is not None:
            raise Conflict(
                f"{principal.name!r} is {why}: register another member (endorsed by this "
                "one) first",
                detail=why,
            )

    def _forget(self) -> None:
        """Drop this worker's remembered look-ups (the others see the anchor move)."""
        with self._lock:
            self._cache.clear()


def _named(principal: Principal | None) -> Holder | None:
    return None if principal is None else (principal, None)


def _enabled(principal: Principal) -> Principal:
    if principal.disabled:
        raise Unauthenticated(detail=f"principal {principal.name} is disabled")
    return principal


def _existing(tx: PrincipalRows, name: str) -> Principal:
    principal = tx.principal_by_name(name)
    if principal is None:
        raise NotFound(f"no principal named {name!r}")
    return principal


def _later(principal: Principal, now: datetime) -> datetime:
    """``now``, or the principal's sessions_since if later (a node whose clock is behind
    never brings ended sessions back)."""
    ended = principal.sessions_since
    return now if ended is None or now > ended else ended


def _self_or_admin(caller: Caller, name: str) -> None:
    if caller.principal is None or caller.principal.name != name:
        caller.require(Role.ADMIN)


def _role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidRequest("role must be one of: " + ", ".join(r.value for r in Role)) from None


def _check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(
            "name must be 1-64 characters of letters, digits, '.', '_', '@', '-', "
            "starting with a letter or digit"
        )
