"""Data-key operations: datakey, encrypt, decrypt, rewrap, each single or batched.

Each item is decided by the one key-use rule (kms/services/key_use.py) and run in the
audited unit of work (kms/services/key_work.py): client errors are per item (a batch
answers each item); a server error (HSM or database down) aborts the whole request and
returns nothing; one audit record is written per item, all of a request's records in one
transaction, before any result leaves: if they cannot be written, the caller gets
StorageUnavailable and no plaintext or ciphertext.

No oracles: every failure to decrypt a blob (malformed, unknown version, bad tag, wrong
context) is the same DecryptionFailed; the precise reason goes to the audit record. A blob
naming a key that does not exist is refused as a key the caller holds no grant on
(NoGrant, kms/services/key_use.py), so that nobody learns from a blob whether its key
exists; a key the caller names to check the blob against (``expected_key``) is compared
only once the blob's key is allowed, and an alias naming no key is just another key.

Blind rewraps: a rewrap by a principal that may not decrypt the blob (a ``rewrap`` grant
without ``decrypt``) still tells it whether the blob opens with the context it gave (the
answer is a new blob or a refusal), which is a test of guessed contexts. That cannot be
hidden (a rewrap that does not authenticate has nothing to re-encrypt), so it is bounded:
each such failure is counted against the principal's ``KMS_BLIND_REWRAP_FAILURES``
(kms/services/cluster.py), and over it every blind rewrap of that principal is refused
(429) before any blob is opened, whatever the blob and context.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from kms.errors import (
    ClientError,
    DecryptionFailed,
    IntegrityFailure,
    InvalidRequest,
    KeyUnusable,
    WrongKey,
)
from kms.formats import blob as blobfmt
from kms.services.audit_events import Caller, EventBuilder
from kms.services.context_hash import ContextHasher
from kms.services.hsm_port import Hsm
from kms.services.key_use import CaseUse, Face, Use, check_caller
from kms.services.key_work import KeyUseRunner, KeyWork
from kms.services.model import DEFAULT_JUSTIFICATION, KekRef, Permission, Principal, Role

MAX_PLAINTEXT = 4096
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
    expected_key: str | None = None  # the key the caller says made the blob (id or alias)


@dataclass(frozen=True)
class RewrapRequest:
    ciphertext: bytes
    context: dict[str, str]
    destination: str | None = None
    justification: str = DEFAULT_JUSTIFICATION
    reference: str | None = None
    destination_context: dict[str, str] | None = None  # None: keep ``context``
    expected_key: str | None = None  # the key the caller says made the blob (id or alias)


@dataclass(frozen=True)
class Sealed:
    """A blob made under ``key_id``/``key_version``; ``plaintext`` only for datakey;
    ``source_key_id`` only for rewrap (the key that made the blob it was given)."""

    key_id: str
    key_version: int
    ciphertext: bytes
    plaintext: bytes | None = field(default=None, repr=False)
    source_key_id: str | None = None


@dataclass(frozen=True)
class Opened:
    key_id: str
    key_version: int
    plaintext: bytes = field(repr=False)


class BlindFailures(Protocol):
    """The per-principal budget of failed blind rewraps (kms/services/cluster.py)."""

    def check(self, principal: Principal) -> None:
        """Refuse (RateLimited, 429) if the principal is over its budget; counts nothing."""
        ...

    def failed(self, principal: Principal) -> None:
        """Count one failed blind rewrap of the principal."""
        ...


class CryptoService:
    def __init__(
        self,
        hsm: Hsm,
        runner: KeyUseRunner,
        random: Callable[[int], bytes] = os.urandom,
        contexts: ContextHasher | None = None,
        blind: BlindFailures | None = None,
    ) -> None:
        self._hsm = hsm
        self._runner = runner
        self._blind = blind  # None: blind rewraps are not bounded
        self._random = random  # IVs; injectable so tests can reproduce exact blobs
        # keyed context hashes for the audit records (one HSM call per item at most)
        self._contexts = contexts or ContextHasher(hsm)

    def datakey(
        self, caller: Caller, ref: str, items: Sequence[DataKeyRequest], face: Face = Face.NATIVE
    ) -> list[Sealed | ClientError]:
        """A fresh DEK from the HSM per item (256 bits unless ``size`` says otherwise),
        wrapped under the key's current version."""

        def one(work: KeyWork, op: EventBuilder, item: DataKeyRequest) -> Sealed:
            op.note(context_sha256=self._contexts.digest(item.context))
            if not 1 <= item.size <= MAX_DATAKEY_BYTES:
                raise InvalidRequest(f"a data key is 1 to {MAX_DATAKEY_BYTES} bytes")
            key = work.use(work.key_id(ref), Use(Permission.DATAKEY, None, face=face)).key
            op.note(key_id=key.key_id, key_version=key.current_version)
            dek = self._hsm.random(item.size)
            sealed = self._seal(work.kek(key.key_id, key.current_version), dek, item.context)
            return replace(sealed, plaintext=dek if item.include_plaintext else None)

        return self._runner.run(caller, "datakey", items, one, (Role.SERVICE,))

    def encrypt(
        self, caller: Caller, ref: str, items: Sequence[EncryptRequest], face: Face = Face.NATIVE
    ) -> list[Sealed | ClientError]:
        """Encrypt small plaintexts (at most 4096 bytes) under the key's current version."""

        def one(work: KeyWork, op: EventBuilder, item: EncryptRequest) -> Sealed:
            op.note(context_sha256=self._contexts.digest(item.context))
            if len(item.plaintext) > MAX_PLAINTEXT:
                raise InvalidRequest(f"plaintext must be at most {MAX_PLAINTEXT} bytes")
            key = work.use(work.key_id(ref), Use(Permission.ENCRYPT, None, face=face)).key
            op.note(key_id=key.key_id, key_version=key.current_version)
            kek = work.kek(key.key_id, key.current_version)
            return self._seal(kek, item.plaintext, item.context)

        return self._runner.run(caller, "encrypt", items, one, (Role.SERVICE,))

    def decrypt(
        self, caller: Caller, items: Sequence[DecryptRequest], face: Face = Face.NATIVE
    ) -> list[Opened | ClientError]:
        """Open blobs; the key and version are read from each blob. A requester opens
        only under an escrow case (``case_id``), within its scope and budget."""

        def one(work: KeyWork, op: EventBuilder, item: DecryptRequest) -> Opened:
            context_hash = self._contexts.digest(item.context)
            _note_unwrap(op, context_hash, item.justification, item.reference, item.case_id)
            check_caller(work.principal.role, item.justification, item.case_id)
            parsed = _parse_blob(op, item.ciphertext)
            case = None
            if item.case_id is not None:
                case = CaseUse(item.case_id, item.context, item.ciphertext)
            use = Use(Permission.DECRYPT, parsed.key_version, item.justification, face, case)
            work.use(parsed.key_id, use, _unknown_key)
            _expect(work, parsed, item.expected_key)
            kek = work.kek(parsed.key_id, parsed.key_version)
            return Opened(kek.key_id, kek.version, self._open(kek, parsed, item.context))

        return self._runner.run(caller, "decrypt", items, one, (Role.SERVICE, Role.REQUESTER))

    def rewrap(
        self, caller: Caller, items: Sequence[RewrapRequest], face: Face = Face.NATIVE
    ) -> list[Sealed | ClientError]:
        """Re-encrypt a blob under the current version of its key (or ``destination``);
        the plaintext never leaves this method. Rewrapping within a key needs the rewrap
        grant; moving a blob to another key, or binding it to another context
        (``destination_context``), needs decrypt and rewrap on the source and rewrap on the
        destination, since whoever can decrypt there could read it. A rewrap without
        decrypt is blind and bounded (see the module doc)."""

        def one(work: KeyWork, op: EventBuilder, item: RewrapRequest) -> Sealed:
            context_hash = self._contexts.digest(item.context)
            _note_unwrap(op, context_hash, item.justification, item.reference, None)
            check_caller(work.principal.role, item.justification, None)
            parsed = _parse_blob(op, item.ciphertext)
            version, code = parsed.key_version, item.justification
            rewrap = Use(Permission.REWRAP, version, code, face)
            source = work.use(parsed.key_id, rewrap, _unknown_key)
            _expect(work, parsed, item.expected_key)
            dest_id = work.key_id(item.destination) if item.destination else parsed.key_id
            dest = work.use(dest_id, Use(Permission.REWRAP, None, face=face)).key
            context = item.context if item.destination_context is None else item.destination_context
            if dest.key_id != parsed.key_id or context != item.context:
                work.use(parsed.key_id, Use(Permission.DECRYPT, version, code, face))
            kek = work.kek(parsed.key_id, version)
            if source.grant.allows(Permission.DECRYPT, code):
                plaintext = self._open(kek, parsed, item.context)
            else:
                plaintext = self._open_blind(work.principal, kek, parsed, item.context)
            sealed = self._seal(work.kek(dest.key_id, dest.current_version), plaintext, context)
            moved = f"to {sealed.key_id} v{sealed.key_version}"
            if item.destination_context is not None:
                moved += f" context_sha256={self._contexts.digest(item.destination_context)}"
            op.note(detail=moved)
            return replace(sealed, source_key_id=parsed.key_id)

        return self._runner.run(caller, "rewrap", items, one, (Role.SERVICE,))

    # -- HSM work ---------------------------------------------------------------------------

    def _open_blind(
        self, principal: Principal, kek: KekRef, parsed: blobfmt.Blob, context: dict[str, str]
    ) -> bytes:
        """``_open`` for a principal that may not decrypt the blob: refused over its budget
        of failures before the HSM is asked, and a failure counted."""
        if self._blind is None:
            return self._open(kek, parsed, context)
        self._blind.check(principal)
        try:
            return self._open(kek, parsed, context)
        except DecryptionFailed as e:
            self._blind.failed(principal)
            e.detail = f"{e.detail}; blind rewrap (no decrypt grant): counted"
            raise

    def _seal(self, kek: KekRef, plaintext: bytes, context: dict[str, str]) -> Sealed:
        iv = self._random(blobfmt.IV_BYTES)
        header = blobfmt.header_for(kek.key_id, kek.version, iv)
        try:
            iv, ct = self._hsm.encrypt(kek, iv, plaintext, header.aad(context))
        except IntegrityFailure as e:
            raise KeyUnusable(detail=str(e)) from e
        blob = replace(header, iv=iv, ciphertext=ct)  # the IV the HSM used (the AAD has none)
        return Sealed(kek.key_id, kek.version, blob.to_bytes())

    def _open(self, kek: KekRef, parsed: blobfmt.Blob, context: dict[str, str]) -> bytes:
        try:
            return self._hsm.decrypt(kek, parsed.iv, parsed.ciphertext, parsed.aad(context))
        except IntegrityFailure as e:
            raise DecryptionFailed(detail=f"authentication failed ({e})") from e


def _unknown_key() -> DecryptionFailed:
    return DecryptionFailed(detail="blob names an unknown key")


def _parse_blob(op: EventBuilder, data: bytes) -> blobfmt.Blob:
    try:
        parsed = blobfmt.parse(data)
    except blobfmt.BlobError as e:
        raise DecryptionFailed(detail=f"malformed blob: {e}") from e
    op.note(key_id=parsed.key_id, key_version=parsed.key_version)
    return parsed


def _expect(work: KeyWork, parsed: blobfmt.Blob, expected: str | None) -> None:
    """WrongKey if the caller named the key that made the blob, and another one did (or
    none: an alias naming no key is answered like one naming another key, so the answer
    does not say whether an alias exists). Asked only once the blob's key is allowed."""
    if expected is not None and work.key_id(expected) != parsed.key_id:
        raise WrongKey(
            "The key ID in the request does not identify the KMS key that encrypted the ciphertext."
        )


def _note_unwrap(
    op: EventBuilder, context_hash: str, code: str, reference: str | None, case_id: str | None
) -> None:
    op.note(
        context_sha256=context_hash,
        justification=code,
        case_id=case_id,
        detail=f"reference={reference}" if reference else None,
    )
