"""SigV4 credentials and request verification, shared by the XKS and AWS KMS faces.

Credentials: an access key id (``KMS`` + 24 characters of base32, A-Z and 2-7) and a
secret (base64 of 32 bytes from the HSM, 44 characters), shown once when issued. At rest
the secret is AES-256-GCM encrypted inside the HSM under a KEK made for the credential and
stored wrapped under the HSM root key. A principal holds at most two active credentials,
so a secret can be rotated without downtime (issue the new one, move clients, revoke the
old one). What a credential may do is decided by its principal's role and grants.

Verification (``verify``), in this order, each failure an Unauthenticated (401) whose
``reason`` the faces map to their own error names: header present and well-formed
(``malformed``); scope service is the face's (``wrong_service``); scope region is the
face's, when it pins one (``wrong_region``: both faces do); ``host`` and ``x-amz-date``
signed, date matching the scope (``malformed``); the headers the face needs signed are
(``unsigned_header``: the AWS KMS face's ``content-type`` and ``x-amz-target``, which
choose the operation and how the body is read); time within five minutes of
ours (``expired``); access key known and active (``unknown_key``); signature over the raw
body and the signed headers (``bad_signature``, compared in constant time); signature not
seen before (``replayed``). The replay check comes last so that only correctly signed
requests are remembered; if the nonce store cannot be written the request is refused
(StorageUnavailable, 503): fail closed. The nonce store is Redis when configured, else
the database table (both shared by every worker and node).

Credentials are cached per worker for ``KMS_AUTH_CACHE_SECONDS``; a revocation is
announced through kms.services.cluster.Invalidations so every worker drops it sooner.
"""

from __future__ import annotations

import base64
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from kms.errors import (
    Conflict,
    IntegrityFailure,
    InvalidRequest,
    NotFound,
    SealBroken,
    StorageUnavailable,
    Unauthenticated,
)
from kms.formats import sigv4 as fmt
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller, format_time
from kms.services.change_quorum import ChangeTx
from kms.services.changes import ChangeService
from kms.services.cluster import CREDENTIAL, Invalidations
from kms.services.hsm_port import Hsm
from kms.services.model import Principal, Role, SigV4Credential, WrappedKek
from kms.services.ports import (
    Clock,
    NonceRows,
    NonceStore,
    SigV4Rows,
    Store,
)
from kms.services.state_cache import HSM_DOWN, cache_version, still_valid

log = logging.getLogger("kms.sigv4")

MAX_SKEW = timedelta(minutes=5)
MAX_ACTIVE = 2
ACCESS_KEY_PREFIX = "KMS"
IV_BYTES = 12


class SigV4Refused(Unauthenticated):
    """A SigV4 request that did not authenticate; ``reason`` says which check failed."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(detail=f"sigv4 {reason}" + (f": {detail}" if detail else ""))
        self.reason = reason


@dataclass(frozen=True)
class SignedRequest:
    """What verification needs of an HTTP request, as received (headers lowercased)."""

    method: str
    raw_path: str
    raw_query: str
    headers: Mapping[str, str]
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class Verified:
    principal: Principal
    access_key_id: str
    region: str
    deferred: DeferredNonce | None = None  # the nonce, when verify() was asked to defer it


@dataclass(frozen=True)
class DeferredNonce:
    """A verified signature's nonce, recorded in the transaction that commits the
    request's audit records instead of one of its own (the database replay store only):
    a replay is then refused at that commit, before any result leaves."""

    nonce: str = field(repr=False)
    now: str
    until: str

    def claim(self, tx: NonceRows) -> None:
        """Record the nonce; SigV4Refused("replayed") if it is already recorded."""
        if not tx.remember_nonce(self.nonce, self.until, self.now):
            raise SigV4Refused("replayed", "this signed request was already received")


class DatabaseNonces:
    """NonceStore on the database's nonce table (when no Redis is configured)."""

    def __init__(self, storage: Store[NonceRows]) -> None:
        self._storage = storage

    def remember(self, nonce: str, now: datetime, until: datetime) -> bool:
        """True the first time ``nonce`` is seen before ``until``; StorageUnavailable if
        the database cannot record it."""
        with self._storage.transaction() as tx:
            return tx.remember_nonce(nonce, format_time(until), format_time(now))

    def prune(self, now: datetime, batch: int = 1000) -> None:
        """Delete expired nonces, ``batch`` per transaction (the writer lock is held
        briefly), until none is left. Background upkeep: logs instead of raising."""
        try:
            while True:
                with self._storage.transaction() as tx:
                    if tx.prune_nonces(format_time(now), batch) < batch:
                        return
        except StorageUnavailable as e:
            log.warning("nonce pruning failed", extra={"detail": e.detail})


class SigV4ServiceTx(ChangeTx, SigV4Rows, NonceRows, Protocol):
    """The rows SigV4Service reads and writes (NonceRows: when no other NonceStore is
    given)."""


class SigV4Service:
    def __init__(
        self,
        storage: Store[SigV4ServiceTx],
        hsm: Hsm,
        audit: AuditTrail,
        clock: Clock,
        cache_seconds: float = 0.0,
        nonces: NonceStore | None = None,
        invalidations: Invalidations | None = None,
        state_version: Callable[[], int | None] = lambda: None,
        *,
        changes: ChangeService,
    ) -> None:
        self._changes = changes  # dual control of credential issuance (changes.py)
        self._storage = storage
        self._state_version = state_version
        self._hsm = hsm
        self._audit = audit
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._database_nonces: DatabaseNonces | None = None
        if nonces is None:
            nonces = self._database_nonces = DatabaseNonces(storage)
        self._nonces = nonces
        # access key id -> (credential, secret, monotonic expiry, state anchor it was read
        # at); active credentials of enabled principals only
        self._cache: OrderedDict[str, tuple[SigV4Credential, str, float, int]] = OrderedDict()
        # (access key id, date, region, service) -> signing key; dropped with the credential
        self._keys: dict[tuple[str, str, str, str], bytes] = {}
        self._lock = threading.Lock()
        self._invalidations = invalidations or Invalidations(None)
        self._invalidations.subscribe(CREDENTIAL, self._drop)

    # -- administration ---------------------------------------------------------------

    def issue(self, caller: Caller, principal_name: str) -> tuple[str, str]:
        """A new credential for the principal: (access key id, secret). The secret is
        returned only here. Refused (409) if the principal already has two active. A
        dual-control change (kms/services/changes.py)."""
        with self._audit.operation(caller, "issue_sigv4_credential") as op:
            caller.require(Role.ADMIN)
            params = {"name": principal_name}
            self._changes.require(caller, "issue_sigv4", params)
            raw = self._hsm.random(47)
            access_key_id = ACCESS_KEY_PREFIX + base64.b32encode(raw[:15]).decode()
            secret = base64.b64encode(raw[15:]).decode()
            op.note(detail=f"principal={principal_name} access_key_id={access_key_id}")
            wrapped = self._hsm.new_wrapped_kek()
            kek = wrapped.ref(_kek_id(access_key_id), 1)
            iv, ct = self._hsm.encrypt(
                kek,
                self._hsm.random(IV_BYTES),
                secret.encode("ascii"),
                access_key_id.encode("ascii"),
            )
            sealed = iv + ct
            with self._storage.transaction() as tx:
                self._changes.consume(tx, caller, "issue_sigv4", params)
                principal = tx.principal_by_name(principal_name)
                if principal is None:
                    raise NotFound("no such principal")
                active = [c for c in tx.sigv4_credentials_of(principal.id) if c.state == "active"]
                if len(active) >= MAX_ACTIVE:
                    raise Conflict(
                        f"the principal already has {MAX_ACTIVE} active credentials; "
                        "revoke one first"
                    )
                tx.add_sigv4_credential(
                    SigV4Credential(
                        access_key_id,
                        principal,
                        sealed,
                        wrapped.wrapped,
                        wrapped.root_label,
                        "active",
                        format_time(self._clock.now()),
                        wrapped.wrap_mechanism,
                    )
                )
                self._audit.append(tx, [op.ok()])
            return access_key_id, secret

    def revoke(self, caller: Caller, principal_name: str, access_key_id: str) -> None:
        """Revoke a credential of the principal. It stops working in this worker at once,
        in the others within the credential cache time (``KMS_AUTH_CACHE_SECONDS``), or
        about a second with Redis (kms.services.cluster)."""
        with self._audit.operation(caller, "revoke_sigv4_credential") as op:
            caller.require(Role.ADMIN)
            op.note(detail=f"principal={principal_name} access_key_id={access_key_id[:40]}")
            with self._storage.transaction() as tx:
                credential = tx.sigv4_credential(access_key_id)
                if credential is None or credential.principal.name != principal_name:
                    raise NotFound("no such credential for this principal")
                if credential.state != "active":
                    raise Conflict("the credential is already revoked")
                tx.set_sigv4_state(access_key_id, "revoked")
                self._audit.append(tx, [op.ok()])
        self._invalidations.publish(CREDENTIAL, access_key_id)

    def prune_nonces(self) -> None:
        """Background upkeep of the database replay store: drop expired nonces."""
        if self._database_nonces is not None:
            self._database_nonces.prune(self._clock.now())

    def _drop(self, access_key_id: str | None) -> None:
        with self._lock:
            self._keys.clear()
            if access_key_id is None:
                self._cache.clear()
            else:
                self._cache.pop(access_key_id, None)

    def _signing_key(self, auth: fmt.Authorization, secret: str) -> bytes:
        """The credential's signing key for the scope's day, region and service (four
        HMACs), kept while the credential is cached."""
        ident = (auth.access_key_id, auth.date, auth.region, auth.service)
        key = self._keys.get(ident)
        if key is None:
            key = fmt.signing_key(secret, auth.date, auth.region, auth.service)
            if self._cache_seconds > 0:
                with self._lock:
                    if len(self._keys) >= 10_000:
                        self._keys.clear()
                    self._keys[ident] = key
        return key

    # -- verification -------------------------------------------------------------------

    def verify(
        self,
        request: SignedRequest,
        service: str,
        defer: bool = False,
        *,
        region: str | None = None,
        signed: tuple[str, ...] = (),
    ) -> Verified:
        """The principal that signed ``request`` for ``service`` (and ``region``, unless
        None: any), having signed at least the headers ``signed`` (lowercase) besides
        ``host`` and ``x-amz-date``; or SigV4Refused (see the module docstring for the
        checks and their order). With ``defer`` and the database as the replay store, the
        nonce is not recorded here but returned as ``Verified.deferred``: the caller must
        hand it to the audited unit of work (``Caller.claim``), which records it in the
        request's audit transaction."""
        header = request.headers.get("authorization")
        if not header:
            raise SigV4Refused("missing", "no Authorization header")
        try:
            auth = fmt.parse_authorization(header)
        except fmt.SigV4FormatError as e:
            raise SigV4Refused("malformed", str(e)) from e
        if auth.service != service:
            raise SigV4Refused("wrong_service", f"scope names service {auth.service!r}")
        if region is not None and auth.region != region:
            raise SigV4Refused("wrong_region", f"scope names region {auth.region!r}")
        if "host" not in auth.signed_headers or "x-amz-date" not in auth.signed_headers:
            raise SigV4Refused("malformed", "host and x-amz-date must be signed")
        unsigned = [name for name in signed if name not in auth.signed_headers]
        if unsigned:
            raise SigV4Refused("unsigned_header", "not signed: " + ", ".join(unsigned))
        amz_date = request.headers.get("x-amz-date", "")
        if not fmt.AMZ_DATE.fullmatch(amz_date) or amz_date[:8] != auth.date:
            raise SigV4Refused("malformed", "X-Amz-Date missing or not the scope's date")
        try:  # the pattern checked the digits: YYYYMMDD'T'HHMMSS'Z'
            d = amz_date
            when = datetime(
                int(d[0:4]), int(d[4:6]), int(d[6:8]), int(d[9:11]), int(d[11:13]), int(d[13:15])
            ).replace(tzinfo=UTC)
        except ValueError as e:
            raise SigV4Refused("malformed", "X-Amz-Date is not a date") from e
        now = self._clock.now()
        if abs(now - when) > MAX_SKEW:
            raise SigV4Refused("expired", "request time is more than 5 minutes from ours")
        if any(name not in request.headers for name in auth.signed_headers):
            raise SigV4Refused("malformed", "a signed header is missing")
        credential, secret = self._active(auth.access_key_id)
        canonical = fmt.canonical_request(
            request.method,
            request.raw_path,
            request.raw_query,
            request.headers,
            auth.signed_headers,
            request.body,
        )
        key = self._signing_key(auth, secret)
        expected = fmt.signature(key, fmt.string_to_sign(amz_date, auth.scope, canonical))
        if not hmac.compare_digest(expected, auth.signature):
            raise SigV4Refused("bad_signature", "signature does not match")
        keep_until = when + MAX_SKEW + timedelta(seconds=1)
        if defer and self._database_nonces is not None:
            deferred = DeferredNonce(auth.signature, format_time(now), format_time(keep_until))
            return Verified(credential.principal, auth.access_key_id, auth.region, deferred)
        if not self._nonces.remember(auth.signature, now, keep_until):
            raise SigV4Refused("replayed", "this signed request was already received")
        return Verified(credential.principal, auth.access_key_id, auth.region)

    def _active(self, access_key_id: str) -> tuple[SigV4Credential, str]:
        """The active credential and its secret (unsealed in the HSM), cached for
        ``cache_seconds`` while the HSM state anchor stays where it was read (a revoked
        credential or a disabled principal is refused at once on every node);
        SigV4Refused("unknown_key") otherwise."""
        self._invalidations.refresh()
        now = time.monotonic()
        # the anchor is read only for a cache to follow (StateRefused: none used)
        version = cache_version(self._state_version) if self._cache_seconds > 0 else None
        with self._lock:
            hit = self._cache.get(access_key_id)
            if hit is not None and hit[2] > now and still_valid(hit[3], version):
                return hit[0], hit[1]
        try:
            with self._storage.reader() as tx:
                credential = tx.sigv4_credential(access_key_id)
        except SealBroken as e:  # a row written outside the server: the generic refusal
            self._audit.record_alarm("sigv4_authenticate", e)
            raise SigV4Refused("unknown_key", e.detail) from e
        if credential is None or credential.state != "active":
            raise SigV4Refused("unknown_key", "unknown or revoked access key")
        if credential.principal.disabled:
            raise SigV4Refused("unknown_key", f"principal {credential.principal.name} is disabled")
        sealed = credential.sealed_secret
        stored = WrappedKek(
            credential.wrapped_kek, credential.root_label, credential.wrap_mechanism
        )
        kek = stored.ref(_kek_id(access_key_id), 1)
        try:
            secret = self._hsm.decrypt(
                kek, sealed[:IV_BYTES], sealed[IV_BYTES:], access_key_id.encode("ascii")
            ).decode("ascii")
        except IntegrityFailure as e:
            raise SigV4Refused("unknown_key", "credential record does not unseal") from e
        if self._cache_seconds > 0 and version not in (None, HSM_DOWN):
            with self._lock:
                expiry = now + self._cache_seconds
                self._cache[access_key_id] = (credential, secret, expiry, version)
                while len(self._cache) > 10_000:
                    self._cache.popitem(last=False)
        return credential, secret


def _kek_id(access_key_id: str) -> str:
    return f"sigv4/{access_key_id}"


def check_access_key_id(value: str) -> str:
    """A syntactically plausible access key id (for path parameters)."""
    if not (16 <= len(value) <= 32 and value.isalnum()):
        raise InvalidRequest("malformed access key id")
    return value
