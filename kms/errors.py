"""One exception root for the whole service.

Each class carries an HTTP status and a stable machine-readable ``code``. Client errors
(4xx) carry a message that is safe to show; server errors (5xx) show only a generic message
and the request id, the precise reason goes to logs. Library exceptions are translated at
the backend boundary (``raise ... from e``) so nothing above the backends sees them.
"""

from __future__ import annotations


class KmsError(Exception):
    """Root of every error the service raises on purpose."""

    status = 500
    code = "internal_error"
    public_message = "internal error"

    def __init__(self, message: str | None = None, *, detail: str | None = None) -> None:
        super().__init__(message or self.public_message)
        self.message = message or self.public_message
        # Precise, non-secret reason for the audit log; never sent to the caller.
        self.detail = detail


class ClientError(KmsError):
    status = 400
    code = "invalid_request"
    public_message = "invalid request"


class InvalidRequest(ClientError):
    pass


class DecryptionFailed(ClientError):
    """One error for every cryptographic failure: the caller learns nothing more."""

    code = "decryption_failed"
    public_message = "the ciphertext could not be decrypted"

    def __init__(self, *, detail: str) -> None:
        super().__init__(self.public_message, detail=detail)


class Unauthenticated(ClientError):
    status = 401
    code = "unauthenticated"
    public_message = "missing or invalid credentials"


class Forbidden(ClientError):
    status = 403
    code = "forbidden"
    public_message = "not allowed"


class NoGrant(Forbidden):
    """The principal holds no grant at all on the key it named, or no key has that name
    (an unknown key id, an alias that does not exist, a blob naming no key): one answer
    for all of them, so that a principal learns nothing about keys it may not use
    (kms/services/key_use.py). The native and AWS KMS faces answer it as any Forbidden;
    the XKS face as its "no such key". ``detail`` (the audit record) says which it was."""


class SealBroken(Forbidden):
    """A database row that grants or describes access fails its HSM seal (edited,
    inserted or unsealed outside the server; kms/services/seals.py). The caller gets the
    ordinary refusal; ``detail`` (audit trail, logs) names the row."""


class NotFound(ClientError):
    status = 404
    code = "not_found"
    public_message = "not found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"
    public_message = "method not allowed"


class Conflict(ClientError):
    status = 409
    code = "conflict"
    public_message = "conflict with the current state"


class KeyStateError(Conflict):
    code = "key_state"
    public_message = "the key is not in a state that allows this operation"

    @classmethod
    def of(cls, state: str) -> KeyStateError:
        return cls(f"the key is {state}", detail=f"state={state}")


class WrongKey(ClientError):
    """The caller named the key that made a blob, and another key made it."""

    code = "incorrect_key"
    public_message = "the key named does not identify the key that made the ciphertext"


class KeyUsageRefused(ClientError):
    """The key's XKS usage does not allow this operation (InvalidKeyUsageException)."""

    code = "invalid_key_usage"
    public_message = "the key's XKS usage does not allow this operation"


class KeyVersionRetired(Conflict):
    """The blob's key version is below the key's minimum decryption version. Said
    plainly (unlike DecryptionFailed): the version is in the blob's clear header and
    only a caller with a grant on the key gets this far."""

    code = "key_version_retired"
    public_message = "this key version is retired"


class ChangeProposed(KmsError):
    """Not a failure: the request is a control-plane change that needs approvals under dual
    control (kms/services/changes.py); it was recorded as pending, not applied. The API
    answers 202 with ``change`` (the pending change's public description)."""

    status = 202
    code = "change_proposed"
    public_message = "the change was proposed; it takes effect once approved and applied"

    def __init__(self, change: dict[str, object]) -> None:
        super().__init__(self.public_message, detail=f"change={change.get('change_id')}")
        self.change = change


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"
    public_message = "request body too large"


class RateLimited(ClientError):
    status = 429
    code = "rate_limited"
    public_message = "too many requests"
    retry_after: int | None = None  # whole seconds: the Retry-After header, when known


class AuditBudgetExceeded(RateLimited):
    """429: the principal is over its audit budget (KMS_AUDIT_BUDGET). Refused before any
    work; the refusal is not chained on its own but coalesced
    (kms/services/audit_budget.py)."""

    code = "audit_budget_exceeded"
    public_message = "too many audited operations"


class ServerError(KmsError):
    """A dependency or the server failed; the caller may retry later."""


class KeyUnusable(ServerError):
    """The HSM answers but cannot unwrap a KEK version (wrong root key or corrupt
    material): an operator problem, not something the caller can fix or retry."""

    code = "key_unusable"
    public_message = "the key cannot be used on this server"


class EscrowUnavailable(ServerError):
    """Escrow cannot run safely as configured (no way to notify the data owner)."""

    status = 503
    code = "escrow_unavailable"
    public_message = "escrow is not available on this server"


class HsmUnavailable(ServerError):
    status = 503
    code = "hsm_unavailable"
    public_message = "the HSM is unavailable"


class UnsignedTailFull(HsmUnavailable):
    """No checkpoint could be signed and the audit records after the newest one reached
    their bound (KMS_AUDIT_MAX_UNSIGNED_RECORDS, kms/services/audit_tail.py): audited
    operations are refused as in an HSM outage until a checkpoint is signed again."""


class PreflightFailed(HsmUnavailable):
    """The module cannot do what the KMS needs; ``detail`` names the step and reason.
    ``permanent``: trying again cannot help (a PIN, a token label, a mechanism, a module
    that does not load or crashes) and must not be tried (HSMs lock a partition after bad
    logins); otherwise the HSM may just not be reachable yet."""

    code = "hsm_preflight_failed"
    public_message = "the HSM cannot serve the KMS as configured"

    def __init__(self, *, detail: str, permanent: bool = True) -> None:
        super().__init__(detail=detail)
        self.permanent = permanent


class StorageUnavailable(ServerError):
    status = 503
    code = "storage_unavailable"
    public_message = "the database is unavailable; nothing was done"


class AuditStateRefused(ServerError):
    """The database's audit chain does not extend the head anchored in the HSM (a
    rollback, a restore from an old backup, a rewritten history) or the anchor cannot be
    read: nothing audited runs until an operator accepts the state (``kms audit
    accept-state``, kms/services/audit_anchor.py)."""

    status = 503
    code = "audit_state_refused"
    public_message = "the audit trail does not match its HSM anchor; an operator must check it"


class StateRefused(AuditStateRefused):
    """The database's sealed rows match no state the HSM anchored (a row rolled back,
    inserted or deleted while no process watched) or the state anchor cannot be read:
    no sealed row is used until an operator accepts the state (``kms audit
    accept-state``, kms/services/state_index.py)."""

    code = "state_refused"
    public_message = "the database does not match its HSM anchor; an operator must check it"


class IntegrityFailure(Exception):
    """Raised by the HSM backend when authenticated decryption fails (tag, AAD, key) or a
    KEK cannot be unwrapped.

    Not a KmsError: the service layer decides what it means to the caller.
    """
