"""The AWS External Key Store (XKS) proxy operations on this KMS's keys (spec v1.0.3).

AWS KMS calls these for the keys of an external key store that points at this server. The
wire format and its byte layouts are in kms/formats/xks.py, the HTTP face in kms/api/xks.py.

A key operation is checked in this order; each failure is its own error, which the face
maps to the spec's error names:

1. the SigV4 principal has the role ``service`` (Forbidden);
2. the external key id names a key of this KMS, by key id or alias (NotFound);
3. the principal's grant on it allows ``xks_encrypt`` (XKS encrypt) or ``xks_decrypt`` with
   the justification ``service_processing`` (XKS decrypt); metadata needs one of them
   (Forbidden). These grant operations are distinct from the native ``encrypt`` and
   ``decrypt``, so AWS's XKS credential opens nothing through the native or AWS KMS faces;
4. the key is enabled (KeyStateError); metadata reports the state instead;
5. the key's XKS policy allows the request's awsPrincipalArn and kmsOperation (Forbidden);
6. the policy's usage allows the operation; encrypt with a CDIV also needs decrypt, since
   the CDIV procedure test-decrypts what it encrypted (KeyUsageRefused);
7. decrypt: the ciphertextMetadata names a version that is not retired (KeyVersionRetired)
   and that opens the ciphertext with this AAD (DecryptionFailed, one error whatever the
   reason: malformed metadata, unknown version, wrong IV, AAD or tag).

The key's current version encrypts; the version in the ciphertextMetadata decrypts. Every
request writes exactly one audit record (xks_health, xks_metadata, xks_encrypt,
xks_decrypt; its detail holds the request metadata, see formats.xks.audit_detail) before
any result leaves this module, in a transaction that reads the key's state, the grant, the
retirement and the XKS policy again. If the record cannot be written the caller gets
StorageUnavailable and nothing else: fail closed.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from kms.errors import (
    ClientError,
    DecryptionFailed,
    Forbidden,
    IntegrityFailure,
    KeyStateError,
    KeyUnusable,
    KmsError,
    NotFound,
    ServerError,
)
from kms.formats import xks as fmt
from kms.formats.xks import RequestMetadata, XksKeyPolicy
from kms.services.audit import AuditTrail, Caller, EventBuilder, format_time
from kms.services.keys import require_not_retired, resolve
from kms.services.lookup_cache import LookupCache, cached_kek
from kms.services.model import DEFAULT_JUSTIFICATION, Grant, KekRef, Key, KeyState, Principal, Role
from kms.services.model import Permission as Op
from kms.services.ports import Clock, Hsm, Storage, Tx

log = logging.getLogger("kms.xks")
T = TypeVar("T")
DEFAULT_POLICY = XksKeyPolicy()
HEALTH_TTL_SECONDS = 30.0  # a successful deep check is reused this long (spec: at most 60 s)
HEALTH_FAILURE_TTL_SECONDS = 5.0  # a failed one, so a broken HSM is not hammered
_PROBE_KEY_ID = "xks-health-probe"  # never a key id of this KMS (those are UUIDs)
_PROBE_PLAINTEXT = b"keyholder-kms xks health probe"
_PROBE_AAD = b"xks-health"


class KeyUsageRefused(ClientError):
    """The key's XKS usage does not allow this operation (InvalidKeyUsageException)."""

    code = "invalid_key_usage"
    public_message = "the key's XKS usage does not allow this operation"


@dataclass(frozen=True)
class EncryptRequest:
    metadata: RequestMetadata
    plaintext: bytes = field(repr=False)
    aad: bytes = b""
    want_cdiv: bool = False


@dataclass(frozen=True)
class DecryptRequest:
    metadata: RequestMetadata
    ciphertext: bytes
    iv: bytes
    tag: bytes
    aad: bytes = b""
    ciphertext_metadata: bytes | None = None


@dataclass(frozen=True)
class Encrypted:
    ciphertext: bytes
    iv: bytes
    tag: bytes
    ciphertext_metadata: bytes
    cdiv: bytes | None


@dataclass(frozen=True)
class KeyMetadata:
    key_spec: str
    key_usage: tuple[str, ...]  # ENCRYPT, DECRYPT: what this caller may do through XKS
    key_status: str  # ENABLED | DISABLED


@dataclass(frozen=True)
class Health:
    fleet_size: int
    proxy_vendor: str
    proxy_model: str
    ekm_vendor: str
    ekm_id: str
    ekm_model: str
    status: str  # ACTIVE (a failed check is an error, not a status)


def _version() -> str:
    try:
        return importlib.metadata.version("keyholder-kms")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class XksService:
    def __init__(
        self,
        storage: Storage,
        hsm: Hsm,
        audit: AuditTrail,
        clock: Clock,
        random: Callable[[int], bytes] = os.urandom,  # IVs; injectable for exact outputs
        lookup_cache_seconds: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._storage = storage
        self._hsm = hsm
        self._audit = audit
        self._clock = clock
        self._random = random
        self._cache = LookupCache(lookup_cache_seconds)
        self._monotonic = monotonic
        self._health_lock = threading.Lock()
        self._health_until = 0.0
        self._health_error: tuple[type[KmsError], str] | None = None
        self._probe_kek: KekRef | None = None

    # -- the four XKS operations ----------------------------------------------------------

    def health(self, caller: Caller, meta: RequestMetadata) -> Health:
        """The proxy and HSM description, after a deep check (root key usable, an AES-GCM
        round trip in the HSM on a probe key of this process, database answering) done at
        most every 30 s per worker; a failed check raises its error (HsmUnavailable ...)."""

        def work(op: EventBuilder) -> tuple[Health, None]:
            if caller.principal is None:
                raise Forbidden("not authenticated")
            self._deep_check()
            model = f"keyholder-kms XKS proxy {_version()}"
            return Health(
                1, "keyholder-kms", model, "PKCS#11", "hsm-1", "PKCS#11 token", "ACTIVE"
            ), None

        return self._audited(caller, "xks_health", meta, work)

    def metadata(self, caller: Caller, ref: str, meta: RequestMetadata) -> KeyMetadata:
        """keySpec, the usages this caller may use through XKS (its grant and the key's XKS
        usage), and ENABLED or DISABLED (any state but enabled)."""

        def work(op: EventBuilder) -> tuple[KeyMetadata, None]:
            with self._storage.reader() as tx:
                _, key, grant, policy = self._prepare(tx, caller, op, ref)
                op.note(key_version=key.current_version)
                _authorize(key.state, grant, policy, meta, None)
            granted = {XKS_GRANTS[g].value for g in grant.operations & XKS_GRANTS.keys()}
            usage = tuple(u.upper() for u in fmt.USAGES if u in policy.usage & granted)
            status = "ENABLED" if key.state is KeyState.ENABLED else "DISABLED"
            return KeyMetadata("AES_256", usage, status), None

        return self._audited(caller, "xks_metadata", meta, work)

    def encrypt(self, caller: Caller, ref: str, request: EncryptRequest) -> Encrypted:
        """AES-256-GCM under the key's current version, the metadata naming that version.
        With ``want_cdiv``: the CDIV is computed, then the output test-decrypted, then
        returned (spec Appendix C); a failed test decrypt is a ServerError."""
        meta = request.metadata

        def work(op: EventBuilder) -> tuple[Encrypted, Callable[[Tx], None]]:
            with self._storage.reader() as tx:
                principal, key, grant, policy = self._prepare(tx, caller, op, ref)
                op.note(key_version=key.current_version)
                _authorize(key.state, grant, policy, meta, Op.ENCRYPT, request.want_cdiv)
                kek = self._kek(tx, key.key_id, key.current_version)
            md = fmt.encode_metadata(kek.version)
            aad = fmt.hsm_aad(request.aad, md)
            iv = self._random(fmt.IV_BYTES)
            try:
                sealed = self._hsm.encrypt(kek, iv, request.plaintext, aad)
            except IntegrityFailure as e:
                raise KeyUnusable(detail=str(e)) from e
            ct, tag = sealed[: -fmt.TAG_BYTES], sealed[-fmt.TAG_BYTES :]
            cdiv = None
            if request.want_cdiv:
                cdiv = fmt.cdiv(request.aad, md, iv, ct, tag)
                self._test_decrypt(kek, iv, ct + tag, aad, request.plaintext)

            def recheck(tx: Tx) -> None:
                self._recheck(tx, principal, key.key_id, meta, Op.ENCRYPT, request.want_cdiv)

            return Encrypted(ct, iv, tag, md, cdiv), recheck

        return self._audited(caller, "xks_encrypt", meta, work)

    def decrypt(self, caller: Caller, ref: str, request: DecryptRequest) -> bytes:
        """The plaintext, if the ciphertext opens under the version its metadata names."""
        meta = request.metadata

        def work(op: EventBuilder) -> tuple[bytes, Callable[[Tx], None]]:
            md = request.ciphertext_metadata or b""
            try:
                version: int | None = fmt.decode_metadata(md)
            except fmt.XksFormatError:
                version = None
            op.note(justification=DEFAULT_JUSTIFICATION, key_version=version)
            with self._storage.reader() as tx:
                principal, key, grant, policy = self._prepare(tx, caller, op, ref)
                _authorize(key.state, grant, policy, meta, Op.DECRYPT)
                if version is None:
                    raise DecryptionFailed(detail="malformed or missing ciphertext metadata")
                require_not_retired(version, key.min_decryption_version)
                if len(request.iv) != fmt.IV_BYTES:  # the spec allows 16; we never make them
                    raise DecryptionFailed(detail=f"{len(request.iv)}-byte IV")
                kek = self._kek(tx, key.key_id, version)
            aad = fmt.hsm_aad(request.aad, md)
            try:
                plaintext = self._hsm.decrypt(
                    kek, request.iv, request.ciphertext + request.tag, aad
                )
            except IntegrityFailure as e:
                raise DecryptionFailed(detail=f"authentication failed ({e})") from e

            def recheck(tx: Tx) -> None:
                self._recheck(tx, principal, key.key_id, meta, Op.DECRYPT, False, version)

            return plaintext, recheck

        return self._audited(caller, "xks_decrypt", meta, work)

    # -- the per-key XKS policy (admin) ---------------------------------------------------

    def policy(self, caller: Caller, ref: str) -> tuple[Key, XksKeyPolicy]:
        """The key and its XKS policy (the default if none was set); admins and auditors."""
        with self._audit.operation(caller, "read_xks_policy"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            with self._storage.reader() as tx:
                key = resolve(tx, ref)
                return key, tx.xks_policy(key.key_id) or DEFAULT_POLICY

    def set_policy(self, caller: Caller, ref: str, policy: XksKeyPolicy) -> Key:
        """Replace the key's XKS policy (admins); takes effect on the next request."""
        with self._audit.operation(caller, "set_xks_policy") as op:
            caller.require(Role.ADMIN)
            op.note(detail=policy.summary())
            with self._storage.transaction() as tx:
                key = resolve(tx, ref)
                op.note(key_id=key.key_id)
                tx.put_xks_policy(key.key_id, policy, format_time(self._clock.now()))
                self._audit.append(tx, [op.ok()])
            return key

    # -- shared machinery -----------------------------------------------------------------

    def _audited(
        self,
        caller: Caller,
        name: str,
        meta: RequestMetadata,
        work: Callable[[EventBuilder], tuple[T, Callable[[Tx], None] | None]],
    ) -> T:
        """Run ``work`` (look-ups and HSM calls), then in one write transaction its re-check
        and the audit record; on any failure record it (with the metadata) and raise a
        KmsError."""
        op = EventBuilder(caller, name)
        op.note(detail=fmt.audit_detail(meta))
        try:
            result, recheck = work(op)
            with self._storage.transaction() as tx:
                if recheck is not None:
                    recheck(tx)
                due = self._audit.append(tx, [op.ok()])
        except KmsError as e:
            self._failed(op, meta, e)
            raise
        except Exception as e:
            log.exception("unexpected error", extra={"op": name, "error": type(e).__name__})
            error = ServerError(detail=type(e).__name__)
            self._failed(op, meta, error)
            raise error from e
        if due:
            self._audit.checkpoint_quietly()
        return result

    def _failed(self, op: EventBuilder, meta: RequestMetadata, error: KmsError) -> None:
        if error.audited:
            return
        reason = error.detail or error.message
        event = replace(op.event, outcome=error.code, detail=fmt.audit_detail(meta, reason))
        self._audit.record_failure_batch([event], error)

    def _prepare(
        self, tx: Tx, caller: Caller, op: EventBuilder, ref: str
    ) -> tuple[Principal, Key, Grant, XksKeyPolicy]:
        principal = caller.require(Role.SERVICE)
        if not fmt.EXTERNAL_KEY_ID.fullmatch(ref):
            raise NotFound("no such key", detail="not an external key id")
        key = resolve(tx, ref)
        op.note(key_id=key.key_id)
        policy = tx.xks_policy(key.key_id) or DEFAULT_POLICY
        return principal, key, tx.grant(key.key_id, principal.id), policy

    def _recheck(
        self,
        tx: Tx,
        principal: Principal,
        key_id: str,
        meta: RequestMetadata,
        operation: Op,
        cdiv: bool,
        version: int | None = None,
    ) -> None:
        """In the audit write transaction: the same checks on fresh rows."""
        access = tx.key_access(key_id, principal.id)
        if access is None:
            raise KeyStateError("the key no longer exists", detail="deleted during request")
        policy = tx.xks_policy(key_id) or DEFAULT_POLICY
        _authorize(access.state, access.grant, policy, meta, operation, cdiv)
        if version is not None:
            require_not_retired(version, access.min_decryption_version)

    def _kek(self, tx: Tx, key_id: str, version: int) -> KekRef:
        return cached_kek(self._cache, lambda: tx, key_id, version)

    def _test_decrypt(
        self, kek: KekRef, iv: bytes, sealed: bytes, aad: bytes, plaintext: bytes
    ) -> None:
        try:
            opened = self._hsm.decrypt(kek, iv, sealed, aad)
        except IntegrityFailure as e:
            raise ServerError(detail="CDIV test decrypt failed") from e
        if not hmac.compare_digest(opened, plaintext):
            raise ServerError(detail="CDIV test decrypt differs")

    def _deep_check(self) -> None:
        now = self._monotonic()
        with self._health_lock:
            if self._health_until > now:
                if self._health_error is None:
                    return
                cls, detail = self._health_error
                raise cls(detail=f"cached: {detail}")
            try:
                self._probe()
            except KmsError as e:
                self._health_error = (type(e), e.detail or e.code)
                self._health_until = now + HEALTH_FAILURE_TTL_SECONDS
                raise
            self._health_error = None
            self._health_until = now + HEALTH_TTL_SECONDS

    def _probe(self) -> None:
        self._storage.check()
        self._hsm.check()
        if self._probe_kek is None:
            wrapped = self._hsm.new_wrapped_kek()
            self._probe_kek = KekRef(_PROBE_KEY_ID, 1, wrapped.wrapped, wrapped.root_label)
        iv = self._random(fmt.IV_BYTES)
        try:
            sealed = self._hsm.encrypt(self._probe_kek, iv, _PROBE_PLAINTEXT, _PROBE_AAD)
            opened = self._hsm.decrypt(self._probe_kek, iv, sealed, _PROBE_AAD)
        except IntegrityFailure as e:
            raise KeyUnusable(detail=f"health probe: {e}") from e
        if opened != _PROBE_PLAINTEXT:
            raise KeyUnusable(detail="health probe round trip differs")


# The grant operation each XKS usage needs, and back.
XKS_GRANTS_BY_USAGE = {Op.ENCRYPT: Op.XKS_ENCRYPT, Op.DECRYPT: Op.XKS_DECRYPT}
XKS_GRANTS = {g.value: u for u, g in XKS_GRANTS_BY_USAGE.items()}


def _authorize(
    state: KeyState,
    grant: Grant,
    policy: XksKeyPolicy,
    meta: RequestMetadata,
    operation: Op | None,
    cdiv: bool = False,
) -> None:
    """Checks 3-6 of the module docstring; ``operation`` None is metadata."""
    if operation is None:
        if not grant.operations & XKS_GRANTS.keys():
            raise Forbidden("no xks grant on this key", detail="no grant")
    else:
        needed = XKS_GRANTS_BY_USAGE[operation]
        if needed.value not in grant.operations:
            raise Forbidden(f"no {needed.value} grant on this key", detail="no grant")
        if operation is Op.DECRYPT and DEFAULT_JUSTIFICATION not in grant.justifications:
            raise Forbidden(
                f"justification {DEFAULT_JUSTIFICATION!r} is not allowed by your grant",
                detail=f"justification {DEFAULT_JUSTIFICATION} not granted",
            )
        if state is not KeyState.ENABLED:
            raise KeyStateError.of(state.value)
    if not policy.principal_allowed(meta.aws_principal_arn):
        raise Forbidden(
            "the key's XKS policy does not allow this AWS principal",
            detail="xks policy refuses awsPrincipalArn",
        )
    if not policy.operation_allowed(meta.kms_operation):
        raise Forbidden(
            "the key's XKS policy does not allow this KMS operation",
            detail="xks policy refuses kmsOperation",
        )
    if operation is None:
        return
    if operation.value not in policy.usage:
        raise KeyUsageRefused(
            f"the key may not {operation.value} through XKS",
            detail=f"xks usage lacks {operation.value}",
        )
    if cdiv and Op.DECRYPT.value not in policy.usage:
        raise KeyUsageRefused(
            "a ciphertext data integrity value needs a key that may also decrypt",
            detail="xks usage lacks decrypt (CDIV test decrypt)",
        )
