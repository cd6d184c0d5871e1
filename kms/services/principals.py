"""Principals and their bearer tokens.

A token is 32 random bytes (base64url) behind a ``kms_`` prefix. Only its SHA-256 is
stored; a token is found by the hash of what the caller presents, so the secret itself is
never compared, stored or logged. A token is shown once, when the principal is created.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from kms.errors import InvalidRequest, SealBroken, Unauthenticated
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller, EventBuilder
from kms.services.model import Principal, Role
from kms.services.ports import AuditRows, Clock, PrincipalRows, Store

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
TOKEN_PREFIX = "kms_"  # noqa: S105 (a prefix, not a secret)
MAX_TOKEN_CHARS = 128
AUTH_CACHE_SIZE = 10_000


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class PrincipalServiceTx(PrincipalRows, AuditRows, Protocol):
    """The rows PrincipalService reads and writes."""


class PrincipalService:
    def __init__(
        self,
        storage: Store[PrincipalServiceTx],
        audit: AuditTrail,
        clock: Clock,
        cache_seconds: float = 0.0,
    ) -> None:
        self._storage = storage
        self._audit = audit
        self._clock = clock
        # token hash -> (principal, monotonic expiry); only successful look-ups are cached
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()

    def authenticate(self, token: str | None) -> Principal:
        """The principal holding ``token``; Unauthenticated for anything else.

        A successful look-up is remembered for ``cache_seconds`` (per worker, at most
        AUTH_CACHE_SIZE tokens), so a change to a principal reaches every worker within
        that time; unknown tokens are never cached."""
        if not token or len(token) > MAX_TOKEN_CHARS or not token.startswith(TOKEN_PREFIX):
            raise Unauthenticated()
        digest = token_hash(token)
        principal = self._remembered(
            "token:" + digest, lambda tx: tx.principal_by_token_hash(digest)
        )
        if principal is None:
            raise Unauthenticated()
        return principal

    def by_certificate_name(self, name: str) -> Principal:
        """The principal called ``name``, for a caller whose identity a verified client
        certificate already proves (its subject CN, kms/api/peer.py); Unauthenticated if
        no principal has exactly that name. Remembered like a token."""
        if not NAME_RE.fullmatch(name):
            raise Unauthenticated(detail="client certificate CN is not a principal name")
        principal = self._remembered("cn:" + name, lambda tx: tx.principal_by_name(name))
        if principal is None:
            raise Unauthenticated(detail="client certificate CN names no principal")
        return principal

    def _remembered(
        self, key: str, load: Callable[[PrincipalRows], Principal | None]
    ) -> Principal | None:
        """``load``'s principal for ``key``; a hit is remembered for ``cache_seconds`` (per
        worker, at most AUTH_CACHE_SIZE entries), a miss never."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[1] > now:
                self._cache.move_to_end(key)
                return hit[0]
        try:
            with self._storage.reader() as tx:
                principal = load(tx)
        except SealBroken as e:  # a row written outside the server: the generic refusal
            self._audit.record_alarm("authenticate", e)
            raise Unauthenticated(detail=e.detail) from e
        if principal is not None and self._cache_seconds > 0:
            with self._lock:
                self._cache[key] = (principal, now + self._cache_seconds)
                while len(self._cache) > AUTH_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return principal

    def create(self, caller: Caller, name: str, role: str) -> tuple[Principal, str]:
        """Create a principal; returns it with its token (the only time it is visible)."""
        with self._audit.operation(caller, "create_principal") as op:
            caller.require(Role.ADMIN)
            parsed_role = _role(role)
            _check_name(name)
            op.note(detail=f"name={name} role={parsed_role.value}")
            token = new_token()
            with self._storage.transaction() as tx:
                principal = tx.add_principal(
                    name, parsed_role, token_hash(token), self._clock.now()
                )
                self._audit.append(tx, [op.ok()])
            return principal, token

    def list_principals(self, caller: Caller) -> list[Principal]:
        with self._audit.operation(caller, "list_principals"):
            caller.require(Role.ADMIN)
            with self._storage.reader() as tx:
                return tx.list_principals()

    def bootstrap_admin(self, name: str) -> str | None:
        """Create the first admin if the database has no principal yet; return its token.
        Idempotent: returns None when principals already exist."""
        _check_name(name)
        op = EventBuilder(Caller(request_id="kms-init", principal=None), "bootstrap_admin")
        with self._storage.transaction() as tx:
            if tx.principal_count():  # every row, sealed or not: never a second first admin
                return None
            token = new_token()
            tx.add_principal(name, Role.ADMIN, token_hash(token), self._clock.now())
            self._audit.append(tx, [op.ok(detail=f"name={name}")])
        return token


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
