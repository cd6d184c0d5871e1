"""Data-key operations: datakey, encrypt, decrypt, rewrap, each single or batched.

Every item of a request is checked in this order: role, justification, key (by reference
or from the blob), grant, key state, version, then the HSM. Client errors are per item
(a batch answers each item); a server error (HSM or database down) aborts the whole
request and returns nothing. One audit record is written per item, all of a request's
records in one transaction, before any result leaves this module: if they cannot be
written, the caller gets StorageUnavailable and no plaintext or ciphertext.

No oracles: every failure to decrypt a blob (malformed, unknown key or version, bad tag,
wrong context) is the same DecryptionFailed; the precise reason goes to the audit record.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import TypeVar

from kms.errors import (
    ClientError,
    DecryptionFailed,
    Forbidden,
    IntegrityFailure,
    InvalidRequest,
    KeyStateError,
    KeyUnusable,
    KeyVersionRetired,
    KmsError,
)
from kms.formats import blob as blobfmt
from kms.formats import context as ctxfmt
from kms.services.audit import AuditTrail, Caller, EventBuilder
from kms.services.escrow import EscrowService
from kms.services.keys import require_enabled, require_not_retired, resolve
from kms.services.lookup_cache import LookupCache, cached_kek
from kms.services.model import (
    DEFAULT_JUSTIFICATION,
    ESCROW_ONLY_JUSTIFICATIONS,
    JUSTIFICATIONS,
    AuditEvent,
    Grant,
    KekRef,
    Key,
    KeyAccess,
    KeyState,
    Principal,
    Role,
)
from kms.services.model import Permission as Op
from kms.services.ports import Hsm, Storage, Tx

MAX_PLAINTEXT = 4096
MAX_BATCH = 1000
DEK_BYTES = 32
MAX_DATAKEY_BYTES = 1024  # the AWS KMS face's NumberOfBytes limit


@dataclass(frozen=True)
class DataKeyRequest:
    context: dict[str, str]
    include_plaintext: bool = True
    size: int = DEK_BYTES  # bytes of key material, 1..MAX_DATAKEY_BYTES


@dataclass(frozen=True)
class EncryptRequest:
    plaintext: bytes = field(repr=False)
    context: dict[str, str]


@dataclass(frozen=True)
class DecryptRequest:
    ciphertext: bytes
    context: dict[str, str]
    justification: str = DEFAULT_JUSTIFICATION
    reference: str | None = None  # free text kept with the justification in the audit trail
    case_id: str | None = None  # an escrow case (requesters only)


@dataclass(frozen=True)
class RewrapRequest:
    ciphertext: bytes
    context: dict[str, str]
    destination: str | None = None
    justification: str = DEFAULT_JUSTIFICATION
    reference: str | None = None
    destination_context: dict[str, str] | None = None  # None: keep ``context``


@dataclass(frozen=True)
class Sealed:
    """A blob made under ``key_id``/``key_version``; ``plaintext`` only for datakey."""

    key_id: str
    key_version: int
    ciphertext: bytes
    plaintext: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Opened:
    key_id: str
    key_version: int
    plaintext: bytes = field(repr=False)


R = TypeVar("R")
I = TypeVar("I")  # noqa: E741


class _Keys:
    """Key, version and grant look-ups for one request; remembers every (key id, operation)
    the request relied on, for the re-check at commit.

    Keys and grants are read in one read transaction, opened on the first look-up that
    needs the database. KEK material comes from the worker's cache. With ``admissions``,
    a plain decrypt may also be admitted from the (key, grant) pair the worker last read
    for this principal: only provisionally, because the re-check at commit decides from
    the database, and never to refuse (before any refusal the pair is read again)."""

    def __init__(
        self, reader: Callable[[], Tx], principal: Principal, cache: LookupCache, admissions: bool
    ) -> None:
        self._reader = reader
        self._tx: Tx | None = None
        self._principal = principal
        self._cache = cache
        self._admissions = admissions
        self._refs: dict[str, str] = {}
        self._keys: dict[str, Key | None] = {}
        self._grants: dict[str, Grant] = {}
        self.provisional: set[str] = set()  # key ids admitted from the worker's cache
        self._remembered: set[str] = set()  # key ids whose fresh pair this request cached
        self.used: set[tuple[str, Op]] = set()
        self.enabled: set[str] = set()  # keys used under an escrow case (state re-checked)
        self.justifications: set[tuple[str, str]] = set()  # (key id, code) relied on
        self.case_uses: dict[str, int] = {}  # unwraps per escrow case in this request
        self.oldest_opened: dict[str, int] = {}  # key id -> lowest version opened

    @property
    def principal(self) -> Principal:
        return self._principal

    @property
    def tx(self) -> Tx:
        if self._tx is None:
            self._tx = self._reader()
        return self._tx

    def by_ref(self, ref: str, operation: Op) -> Key:
        """The key a caller named (id or alias), if the caller may use it for ``operation``."""
        if ref not in self._refs:
            resolved = resolve(self.tx, ref)
            self._refs[ref] = resolved.key_id
            self._keys[resolved.key_id] = resolved
        key = self._keys[self._refs[ref]]
        assert key is not None  # resolve() raised NotFound otherwise
        return self.allowed(key, operation)

    def by_id(self, key_id: str) -> Key | None:
        if key_id not in self._keys:
            self._keys[key_id] = self.tx.key_by_id(key_id)
        return self._keys[key_id]

    def by_blob(self, parsed: blobfmt.Blob, operation: Op) -> tuple[Key, KekRef]:
        key_id = parsed.key_id
        if operation is Op.DECRYPT and self._admissions:  # never for sealing (current version)
            self._admit_from_cache(key_id, parsed.key_version)
        key = self.by_id(key_id)
        if key is None:
            raise DecryptionFailed(detail="blob names an unknown key")
        self.allowed(key, operation)
        remember = key_id not in self.provisional and key_id not in self._remembered
        if operation is Op.DECRYPT and remember:
            self._cache.put(self._access_ident(key_id), (key, self._grant(key_id)))
            self._remembered.add(key_id)
        return key, self.opening(key, parsed.key_version)

    def _access_ident(self, key_id: str) -> tuple[str, str, int]:
        return ("decrypt-access", key_id, self._principal.id)

    def _admit_from_cache(self, key_id: str, version: int) -> None:
        """Use the worker's cached (key, grant) if it admits a decrypt under ``version``;
        otherwise, and whenever cached data would refuse, read from the database."""
        if key_id in self._keys and key_id not in self.provisional:
            return  # read by this request
        pair: tuple[Key | None, Grant] | None = (
            (self._keys[key_id], self._grants[key_id])
            if key_id in self.provisional
            else self._cache.get(self._access_ident(key_id))
        )
        if pair is not None and _admits(*pair, version):
            self._keys[key_id], self._grants[key_id] = pair
            self.provisional.add(key_id)
        else:
            self._read_again(key_id)

    def _read_again(self, key_id: str) -> None:
        """Forget what this request took from the cache for ``key_id``."""
        if key_id in self.provisional:
            self.provisional.discard(key_id)
            del self._keys[key_id], self._grants[key_id]

    def forget_admissions(self) -> None:
        """Drop the worker's cached pairs this request was admitted with (they were stale)."""
        for key_id in self.provisional:
            self._cache.drop(self._access_ident(key_id))

    def opening(self, key: Key, version: int) -> KekRef:
        """The KEK to open a blob under ``version``, unless that version is retired."""
        require_not_retired(version, key.min_decryption_version)
        oldest = self.oldest_opened.get(key.key_id, version)
        self.oldest_opened[key.key_id] = min(oldest, version)
        return self.kek(key, version)

    def kek(self, key: Key, version: int) -> KekRef:
        return cached_kek(self._cache, lambda: self.tx, key.key_id, version)

    def _grant(self, key_id: str) -> Grant:
        if key_id not in self._grants:
            self._grants[key_id] = self.tx.grant(key_id, self._principal.id)
        return self._grants[key_id]

    def justified(self, key_id: str, code: str) -> None:
        """Forbidden unless the grant on the key allows this justification."""
        if code not in self._grant(key_id).justifications:
            self._read_again(key_id)  # refuse only on a grant this request read
        if code not in self._grant(key_id).justifications:
            raise Forbidden(
                f"justification {code!r} is not allowed by your grant on this key",
                detail=f"justification {code} not granted",
            )
        self.justifications.add((key_id, code))

    def allowed(self, key: Key, operation: Op) -> Key:
        if operation.value not in self._grant(key.key_id).operations:
            raise Forbidden(f"no {operation.value} grant on this key", detail="no grant")
        require_enabled(key)
        self.used.add((key.key_id, operation))
        return key

    def recheck(self, tx: Tx) -> None:
        """Inside the audit write transaction, from the database (never the cache): refuse
        if a key the request used was disabled or deleted, its grant revoked, or a version it
        opened retired, meanwhile. One read per key."""
        seen: dict[str, KeyAccess | None] = {}

        def access(key_id: str) -> KeyAccess | None:
            if key_id not in seen:
                seen[key_id] = tx.key_access(key_id, self._principal.id)
            return seen[key_id]

        for key_id in sorted({k for k, _ in self.used} | self.enabled):
            now = access(key_id)
            if now is None:
                raise KeyStateError("the key no longer exists", detail="deleted during request")
            if now.state is not KeyState.ENABLED:
                raise KeyStateError.of(now.state.value)
        for key_id, operation in sorted(self.used):
            granted = access(key_id)
            if granted is not None and operation.value not in granted.grant.operations:
                raise Forbidden(f"no {operation.value} grant on this key", detail="grant revoked")
        for key_id, code in sorted(self.justifications):
            granted = access(key_id)
            if granted is None or code not in granted.grant.justifications:
                raise Forbidden(
                    f"justification {code!r} is no longer allowed on this key",
                    detail="justification revoked",
                )
        for key_id, oldest in sorted(self.oldest_opened.items()):  # grants and escrow alike
            now = access(key_id)
            if now is not None and oldest < now.min_decryption_version:
                raise KeyVersionRetired(
                    f"version {oldest} of this key was retired during the request",
                    detail="retired during request",
                )


class CryptoService:
    def __init__(
        self,
        storage: Storage,
        hsm: Hsm,
        audit: AuditTrail,
        escrow: EscrowService | None = None,
        random: Callable[[int], bytes] = os.urandom,
        lookup_cache_seconds: float = 0.0,
    ) -> None:
        self._storage = storage
        self._hsm = hsm
        self._audit = audit
        self._escrow = escrow
        self._random = random  # IVs; injectable so tests can reproduce exact blobs
        self._cache = LookupCache(lookup_cache_seconds)

    def datakey(
        self, caller: Caller, ref: str, items: Sequence[DataKeyRequest]
    ) -> list[Sealed | ClientError]:
        """A fresh DEK from the HSM per item (256 bits unless ``size`` says otherwise),
        wrapped under the key's current version."""

        def one(keys: _Keys, op: EventBuilder, item: DataKeyRequest) -> Sealed:
            op.note(context_sha256=ctxfmt.digest(item.context))
            if not 1 <= item.size <= MAX_DATAKEY_BYTES:
                raise InvalidRequest(f"a data key is 1 to {MAX_DATAKEY_BYTES} bytes")
            key = keys.by_ref(ref, Op.DATAKEY)
            op.note(key_id=key.key_id, key_version=key.current_version)
            dek = self._hsm.random(item.size)
            sealed = self._seal(keys.kek(key, key.current_version), dek, item.context)
            return replace(sealed, plaintext=dek if item.include_plaintext else None)

        return self._run(caller, "datakey", items, one)

    def encrypt(
        self, caller: Caller, ref: str, items: Sequence[EncryptRequest]
    ) -> list[Sealed | ClientError]:
        """Encrypt small plaintexts (at most 4096 bytes) under the key's current version."""

        def one(keys: _Keys, op: EventBuilder, item: EncryptRequest) -> Sealed:
            op.note(context_sha256=ctxfmt.digest(item.context))
            if len(item.plaintext) > MAX_PLAINTEXT:
                raise InvalidRequest(f"plaintext must be at most {MAX_PLAINTEXT} bytes")
            key = keys.by_ref(ref, Op.ENCRYPT)
            op.note(key_id=key.key_id, key_version=key.current_version)
            return self._seal(keys.kek(key, key.current_version), item.plaintext, item.context)

        return self._run(caller, "encrypt", items, one)

    def decrypt(
        self, caller: Caller, items: Sequence[DecryptRequest]
    ) -> list[Opened | ClientError]:
        """Open blobs; the key and version are read from each blob."""

        def one(keys: _Keys, op: EventBuilder, item: DecryptRequest) -> Opened:
            _note_unwrap(op, item.context, item.justification, item.reference, item.case_id)
            if item.case_id is not None:
                return self._open_under_case(keys, op, caller, item)
            if keys.principal.role is not Role.SERVICE:
                raise Forbidden("a requester unwraps only within an escrow case")
            parsed, kek = self._parse(keys, op, item.ciphertext, Op.DECRYPT)
            keys.justified(kek.key_id, item.justification)
            return Opened(kek.key_id, kek.version, self._open(kek, parsed, item.context))

        return self._run(caller, "decrypt", items, one, (Role.SERVICE, Role.REQUESTER))

    def _open_under_case(
        self, keys: _Keys, op: EventBuilder, caller: Caller, item: DecryptRequest
    ) -> Opened:
        assert item.case_id is not None
        if keys.principal.role is not Role.REQUESTER or self._escrow is None:
            raise Forbidden("escrow cases are for requesters")
        parsed = _parse_blob(item.ciphertext)
        op.note(key_id=parsed.key_id, key_version=parsed.key_version)
        key = keys.by_id(parsed.key_id)
        if key is None:
            raise DecryptionFailed(detail="blob names an unknown key")
        used = keys.case_uses.get(item.case_id, 0)
        self._escrow.check_unwrap(
            keys.tx,
            caller,
            item.case_id,
            parsed,
            item.ciphertext,
            item.context,
            item.justification,
            used,
        )
        require_enabled(key)
        keys.enabled.add(key.key_id)
        kek = keys.opening(key, parsed.key_version)
        plaintext = self._open(kek, parsed, item.context)
        keys.case_uses[item.case_id] = used + 1
        return Opened(kek.key_id, kek.version, plaintext)

    def rewrap(self, caller: Caller, items: Sequence[RewrapRequest]) -> list[Sealed | ClientError]:
        """Re-encrypt a blob under the current version of its key (or ``destination``);
        the plaintext never leaves this method. Rewrapping within a key needs the rewrap
        grant; moving a blob to another key, or binding it to another context
        (``destination_context``), needs decrypt and rewrap on the source and rewrap on the
        destination, since whoever can decrypt there could read it."""

        def one(keys: _Keys, op: EventBuilder, item: RewrapRequest) -> Sealed:
            _note_unwrap(op, item.context, item.justification, item.reference, None)
            parsed, kek = self._parse(keys, op, item.ciphertext, Op.REWRAP)
            keys.justified(kek.key_id, item.justification)
            dest = keys.by_ref(item.destination or kek.key_id, Op.REWRAP)
            context = item.context if item.destination_context is None else item.destination_context
            if dest.key_id != kek.key_id or context != item.context:
                source = keys.by_id(kek.key_id)
                assert source is not None
                keys.allowed(source, Op.DECRYPT)
            plaintext = self._open(kek, parsed, item.context)
            sealed = self._seal(keys.kek(dest, dest.current_version), plaintext, context)
            moved = f"to {sealed.key_id} v{sealed.key_version}"
            if item.destination_context is not None:
                moved += f" context_sha256={ctxfmt.digest(item.destination_context)}"
            op.note(detail=moved)
            return sealed

        return self._run(caller, "rewrap", items, one)

    # -- shared machinery -------------------------------------------------------------------

    def _run(
        self,
        caller: Caller,
        name: str,
        items: Sequence[I],
        one: Callable[[_Keys, EventBuilder, I], R],
        roles: tuple[Role, ...] = (Role.SERVICE,),
    ) -> list[R | ClientError]:
        with self._audit.operation(caller, name):
            principal = caller.require(*roles)
            if not 1 <= len(items) <= MAX_BATCH:
                raise InvalidRequest(f"a batch holds 1 to {MAX_BATCH} items")
        try:
            results, due = self._attempt(caller, name, principal, items, one, admissions=True)
        except _StaleAdmission:  # once, reading everything from the database
            results, due = self._attempt(caller, name, principal, items, one, admissions=False)
        if due:
            self._audit.checkpoint_quietly()
        return results

    def _attempt(
        self,
        caller: Caller,
        name: str,
        principal: Principal,
        items: Sequence[I],
        one: Callable[[_Keys, EventBuilder, I], R],
        admissions: bool,
    ) -> tuple[list[R | ClientError], bool]:
        """Run the request; its results and whether an audit checkpoint is due. Raises
        _StaleAdmission, having recorded nothing, if the re-check refused a request that
        had been admitted from the worker's cache."""
        results: list[R | ClientError] = []
        events: list[AuditEvent] = []
        op = EventBuilder(caller, name)
        # Look-ups and HSM work in a read transaction; then a short write transaction
        # re-checks what the request relied on (keys, grants, escrow budget) and appends
        # the audit records. Results leave only after the records committed.
        try:
            with ExitStack() as reading:
                keys = _Keys(
                    lambda: reading.enter_context(self._storage.reader()),
                    principal,
                    self._cache,
                    admissions,
                )
                for item in items:
                    op = EventBuilder(caller, name)
                    try:
                        results.append(one(keys, op, item))
                        events.append(op.ok())
                    except ClientError as e:
                        e.audited = True  # recorded with the others below
                        results.append(e)
                        events.append(op.failed(e.code, e.detail or e.message))
            op = EventBuilder(caller, name)  # failures past this point are request-wide
            drafts = self._audit.drafts(events)
            with self._storage.transaction() as tx:
                try:
                    self._recheck(keys, tx)
                except ClientError as e:
                    if keys.provisional:
                        keys.forget_admissions()
                        raise _StaleAdmission from e
                    raise
                due = self._audit.append_drafts(tx, drafts)
        except _StaleAdmission:
            raise
        except Exception as e:
            # Nothing is returned, so every item is recorded as failed.
            failed = events if len(events) == len(items) else [*events, op.event]
            self._abort(caller, name, len(items), failed, e)
            raise
        return results, due

    def _recheck(self, keys: _Keys, tx: Tx) -> None:
        keys.recheck(tx)
        for case_id, count in keys.case_uses.items():
            assert self._escrow is not None
            self._escrow.consume(tx, case_id, count)

    def _abort(
        self, caller: Caller, name: str, total: int, events: list[AuditEvent], error: Exception
    ) -> None:
        """Nothing of the request is returned: record every item as failed with the error."""
        code = error.code if isinstance(error, KmsError) else "internal_error"
        detail = (error.detail if isinstance(error, KmsError) else None) or type(error).__name__
        failed = [replace(ev, outcome=code, detail=detail) for ev in events]
        failed += [
            replace(EventBuilder(caller, name).event, outcome=code, detail="batch aborted")
            for _ in range(total - len(failed))
        ]
        self._audit.record_failure_batch(failed, error)

    def _seal(self, kek: KekRef, plaintext: bytes, context: dict[str, str]) -> Sealed:
        iv = self._random(blobfmt.IV_BYTES)
        header = blobfmt.header_for(kek.key_id, kek.version, iv)
        try:
            ct = self._hsm.encrypt(kek, iv, plaintext, header.aad(context))
        except IntegrityFailure as e:
            raise KeyUnusable(detail=str(e)) from e
        return Sealed(kek.key_id, kek.version, replace(header, ciphertext=ct).to_bytes())

    def _parse(
        self, keys: _Keys, op: EventBuilder, data: bytes, operation: Op
    ) -> tuple[blobfmt.Blob, KekRef]:
        parsed = _parse_blob(data)
        op.note(key_id=parsed.key_id, key_version=parsed.key_version)
        _, kek = keys.by_blob(parsed, operation)
        return parsed, kek

    def _open(self, kek: KekRef, parsed: blobfmt.Blob, context: dict[str, str]) -> bytes:
        try:
            return self._hsm.decrypt(kek, parsed.iv, parsed.ciphertext, parsed.aad(context))
        except IntegrityFailure as e:
            raise DecryptionFailed(detail=f"authentication failed ({e})") from e


class _StaleAdmission(Exception):
    """The commit-time re-check refused what the worker's cache had admitted."""


def _admits(key: Key | None, grant: Grant, version: int) -> bool:
    """Whether ``key`` and ``grant`` allow a plain decrypt of a blob under ``version``."""
    return (
        key is not None
        and key.state is KeyState.ENABLED
        and Op.DECRYPT.value in grant.operations
        and version >= key.min_decryption_version
    )


def _parse_blob(data: bytes) -> blobfmt.Blob:
    try:
        return blobfmt.parse(data)
    except blobfmt.BlobError as e:
        raise DecryptionFailed(detail=f"malformed blob: {e}") from e


def _note_unwrap(
    op: EventBuilder, context: dict[str, str], code: str, reference: str | None, case_id: str | None
) -> None:
    op.note(
        context_sha256=ctxfmt.digest(context),
        justification=code,
        case_id=case_id,
        detail=f"reference={reference}" if reference else None,
    )
    if code not in JUSTIFICATIONS:
        raise InvalidRequest("justification must be one of: " + ", ".join(sorted(JUSTIFICATIONS)))
    if case_id is None and code in ESCROW_ONLY_JUSTIFICATIONS:
        raise Forbidden(
            f"justification {code!r} needs an escrow case",
            detail=f"justification {code} needs an escrow case",
        )
