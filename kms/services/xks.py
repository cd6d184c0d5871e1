"""The AWS External Key Store (XKS) proxy operations on this KMS's keys (spec v1.0.3).

AWS KMS calls these for the keys of an external key store that points at this server. The
wire format and its byte layouts are in kms/formats/xks.py, the HTTP face in kms/api/xks.py.

Every operation runs in the audited unit of work of kms/services/key_work.py and is decided
by the one key-use rule of kms/services/key_use.py, on the XKS face: the principal needs the
role ``service`` and a grant of ``xks_encrypt`` or ``xks_decrypt`` (distinct from the native
``encrypt`` and ``decrypt``, so AWS's XKS credential opens nothing through the native or AWS
KMS faces; decrypt also needs the justification ``service_processing``), the key must be
enabled (metadata reports the state instead), and the key's XKS policy must allow the
request's awsPrincipalArn, kmsOperation and usage. The external key id names a key of this
KMS by key id or alias. A key that does not exist and a key the principal holds no grant
on at all get the same NoGrant refusal, which the face answers as KeyNotFoundException
(the spec's answer for an unknown key): the XKS credential learns nothing about keys it may
not use.

The key's current version encrypts; the version in the ciphertextMetadata decrypts (one
DecryptionFailed whatever the reason: malformed metadata, unknown version, wrong IV, AAD or
tag). Every request writes exactly one audit record (xks_health, xks_metadata, xks_encrypt,
xks_decrypt; its detail holds the request metadata, see formats.xks.audit_detail) before
any result leaves this module. If the record cannot be written the caller gets
StorageUnavailable and nothing else: fail closed.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kms.errors import (
    ClientError,
    DecryptionFailed,
    IntegrityFailure,
    KeyUnusable,
    KmsError,
    NotFound,
    ServerError,
)
from kms.formats import xks as fmt
from kms.formats.xks import RequestMetadata, XksKeyPolicy
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller, EventBuilder, format_time
from kms.services.change_quorum import ChangeTx
from kms.services.changes import ChangeService
from kms.services.hsm_port import Hsm
from kms.services.key_refs import resolve
from kms.services.key_use import XKS_USAGE, Face, Use, XksCall
from kms.services.key_work import KeyUseRunner, KeyWork
from kms.services.model import DEFAULT_JUSTIFICATION, KekRef, Key, KeyState, Permission, Role
from kms.services.ports import (
    Clock,
    StorageUpkeep,
    Store,
    XksRows,
)

T = TypeVar("T")
DEFAULT_POLICY = XksKeyPolicy()
HEALTH_TTL_SECONDS = 30.0  # a successful deep check is reused this long (spec: at most 60 s)
HEALTH_FAILURE_TTL_SECONDS = 5.0  # a failed one, so a broken HSM is not hammered
_PROBE_KEY_ID = "xks-health-probe"  # never a key id of this KMS (those are UUIDs)
_PROBE_PLAINTEXT = b"keyholder-kms xks health probe"
_PROBE_AAD = b"xks-health"


class XksServiceTx(ChangeTx, XksRows, Protocol):
    """The rows the per-key XKS policy operations read and write."""


class XksStore(Store[XksServiceTx], StorageUpkeep, Protocol):
    """The database as XksService uses it: those rows, and the deep health check."""


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
        storage: XksStore,
        hsm: Hsm,
        audit: AuditTrail,
        clock: Clock,
        runner: KeyUseRunner,
        random: Callable[[int], bytes] = os.urandom,  # IVs; injectable for exact outputs
        monotonic: Callable[[], float] = time.monotonic,
        *,
        changes: ChangeService,
    ) -> None:
        self._changes = changes  # dual control of the XKS policy (changes.py)
        self._storage = storage
        self._hsm = hsm
        self._audit = audit
        self._clock = clock
        self._runner = runner
        self._random = random
        self._monotonic = monotonic
        self._health_lock = threading.Lock()
        self._health_until = 0.0
        self._health_error: tuple[type[KmsError], str] | None = None
        self._probe_kek: KekRef | None = None

    @contextmanager
    def request(self, caller: Caller, name: str, meta: RequestMetadata) -> Iterator[None]:
        """The audited scope of one XKS request once its metadata is known: a refusal in
        it (bad input too) is recorded with the metadata in the record's detail."""
        with self._audit.operation(caller, name) as op:
            op.describe_failures(lambda reason: fmt.audit_detail(meta, reason))
            yield

    # -- the four XKS operations ----------------------------------------------------------

    def health(self, caller: Caller, meta: RequestMetadata) -> Health:
        """The proxy and HSM description, after a deep check (root key usable, an AES-GCM
        round trip in the HSM on a probe key of this process, database answering) done at
        most every 30 s per worker; a failed check raises its error (HsmUnavailable ...)."""

        def work(work: KeyWork, op: EventBuilder) -> Health:
            self._deep_check()
            model = f"keyholder-kms XKS proxy {_version()}"
            return Health(1, "keyholder-kms", model, "PKCS#11", "hsm-1", "PKCS#11 token", "ACTIVE")

        return self._one(caller, "xks_health", meta, work, tuple(Role))

    def metadata(self, caller: Caller, ref: str, meta: RequestMetadata) -> KeyMetadata:
        """keySpec, the usages this caller may use through XKS (its grant and the key's XKS
        usage), and ENABLED or DISABLED (any state but enabled)."""

        def work(work: KeyWork, op: EventBuilder) -> KeyMetadata:
            rows = work.use(self._key_id(work, op, ref), _use(None, None, meta))
            op.note(key_version=rows.key.current_version)
            policy = rows.xks_policy or DEFAULT_POLICY
            usage = tuple(
                u.upper()
                for p, u in XKS_USAGE.items()
                if rows.grant.allows(p) and u in policy.usage
            )
            usage = tuple(sorted(usage, key=lambda u: fmt.USAGES.index(u.lower())))
            status = "ENABLED" if rows.key.state is KeyState.ENABLED else "DISABLED"
            return KeyMetadata("AES_256", usage, status)

        return self._one(caller, "xks_metadata", meta, work)

    def encrypt(self, caller: Caller, ref: str, request: EncryptRequest) -> Encrypted:
        """AES-256-GCM under the key's current version, the metadata naming that version.
        With ``want_cdiv``: the CDIV is computed, then the output test-decrypted, then
        returned (spec Appendix C); a failed test decrypt is a ServerError."""

        def work(work: KeyWork, op: EventBuilder) -> Encrypted:
            use = _use(Permission.XKS_ENCRYPT, None, request.metadata, request.want_cdiv)
            key = work.use(self._key_id(work, op, ref), use).key
            op.note(key_version=key.current_version)
            kek = work.kek(key.key_id, key.current_version)
            md = fmt.encode_metadata(kek.version)
            aad = fmt.hsm_aad(request.aad, md)
            iv = self._random(fmt.IV_BYTES)
            try:
                iv, sealed = self._hsm.encrypt(kek, iv, request.plaintext, aad)
            except IntegrityFailure as e:
                raise KeyUnusable(detail=str(e)) from e
            ct, tag = sealed[: -fmt.TAG_BYTES], sealed[-fmt.TAG_BYTES :]
            cdiv = None
            if request.want_cdiv:
                cdiv = fmt.cdiv(request.aad, md, iv, ct, tag)
                self._test_decrypt(kek, iv, ct + tag, aad, request.plaintext)
            return Encrypted(ct, iv, tag, md, cdiv)

        return self._one(caller, "xks_encrypt", request.metadata, work)

    def decrypt(self, caller: Caller, ref: str, request: DecryptRequest) -> bytes:
        """The plaintext, if the ciphertext opens under the version its metadata names."""

        def work(work: KeyWork, op: EventBuilder) -> bytes:
            md = request.ciphertext_metadata or b""
            try:
                version: int | None = fmt.decode_metadata(md)
            except fmt.XksFormatError:
                version = None
            op.note(justification=DEFAULT_JUSTIFICATION, key_version=version)
            use = _use(Permission.XKS_DECRYPT, version, request.metadata)
            key_id = work.use(self._key_id(work, op, ref), use).key.key_id
            if version is None:
                raise DecryptionFailed(detail="malformed or missing ciphertext metadata")
            if len(request.iv) != fmt.IV_BYTES:  # the spec allows 16; we never make them
                raise DecryptionFailed(detail=f"{len(request.iv)}-byte IV")
            kek = work.kek(key_id, version)
            aad = fmt.hsm_aad(request.aad, md)
            try:
                return self._hsm.decrypt(kek, request.iv, request.ciphertext + request.tag, aad)
            except IntegrityFailure as e:
                raise DecryptionFailed(detail=f"authentication failed ({e})") from e

        return self._one(caller, "xks_decrypt", request.metadata, work)

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
            params = {"key": ref, **policy_params(policy)}
            self._changes.require(caller, "set_xks_policy", params, key_ref=ref)
            with self._storage.transaction() as tx:
                key = resolve(tx, ref)
                self._changes.consume(tx, caller, "set_xks_policy", {**params, "key": key.key_id})
                op.note(key_id=key.key_id)
                tx.put_xks_policy(key.key_id, policy, format_time(self._clock.now()))
                self._audit.append(tx, [op.ok()])
            return key

    # -- shared machinery -----------------------------------------------------------------

    def _one(
        self,
        caller: Caller,
        name: str,
        meta: RequestMetadata,
        work: Callable[[KeyWork, EventBuilder], T],
        roles: tuple[Role, ...] = (Role.SERVICE,),
    ) -> T:
        """Run ``work`` as a one-item request of the audited unit of work; its audit
        record's detail holds the request metadata. Raises the item's client error."""

        def one(key_work: KeyWork, op: EventBuilder, _: None) -> T:
            op.note(detail=fmt.audit_detail(meta))
            op.describe_failures(lambda reason: fmt.audit_detail(meta, reason))
            return work(key_work, op)

        (result,) = self._runner.run(caller, name, [None], one, roles)
        if isinstance(result, ClientError):
            raise result
        return result

    def _key_id(self, work: KeyWork, op: EventBuilder, ref: str) -> str | None:
        """The key id ``ref`` names (None: an alias naming no key, which ``work.use``
        refuses as the one rule says)."""
        if not fmt.EXTERNAL_KEY_ID.fullmatch(ref):
            raise NotFound("no such key", detail="not an external key id")
        key_id = work.key_id(ref)
        op.note(key_id=key_id)
        return key_id

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
            self._probe_kek = wrapped.ref(_PROBE_KEY_ID, 1)
        iv = self._random(fmt.IV_BYTES)
        try:
            iv, sealed = self._hsm.encrypt(self._probe_kek, iv, _PROBE_PLAINTEXT, _PROBE_AAD)
            opened = self._hsm.decrypt(self._probe_kek, iv, sealed, _PROBE_AAD)
        except IntegrityFailure as e:
            raise KeyUnusable(detail=f"health probe: {e}") from e
        if opened != _PROBE_PLAINTEXT:
            raise KeyUnusable(detail="health probe round trip differs")


def _use(
    permission: Permission | None, version: int | None, meta: RequestMetadata, cdiv: bool = False
) -> Use:
    """A use of a key through the XKS face (decrypts carry the only justification AWS has)."""
    code = DEFAULT_JUSTIFICATION if permission is Permission.XKS_DECRYPT else None
    call = XksCall(meta.aws_principal_arn, meta.kms_operation, cdiv)
    return Use(permission, version, code, Face.XKS, xks=call)


def policy_params(policy: XksKeyPolicy) -> dict[str, Any]:
    """The policy as a dual-control change records it (kms/formats/change.py)."""
    return {
        "usage": sorted(policy.usage),
        "aws_principals": None if policy.aws_principals is None else list(policy.aws_principals),
        "kms_operations": None if policy.kms_operations is None else list(policy.kms_operations),
    }
