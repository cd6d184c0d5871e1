"""What each PKCS#11 error means to the backend: bad data, worth a reconnect, or a
rejected PIN. ``Pkcs11Hsm`` (pkcs11_hsm.py) turns them into IntegrityFailure, a retry
after reconnecting, or HsmUnavailable."""

from __future__ import annotations

from pkcs11 import exceptions as p11e

from kms.backends.hsm.pkcs11_calls import NotInitialized

# Errors a real decrypt can return when the tag, AAD, IV or key is wrong. SoftHSM reports a
# bad tag as CKR_GENERAL_ERROR, so a health probe tells tag failures from a broken HSM.
INTEGRITY_ERRORS = (
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.GeneralError,
    p11e.FunctionFailed,
)
# Errors unwrapping a KEK whose wrapped bytes are corrupt or were made by another root key.
UNWRAP_ERRORS = (
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
    p11e.GeneralError,
    p11e.FunctionFailed,
)
# Errors after which a fresh initialise + login may help.
TRANSIENT = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceError,
    p11e.DeviceRemoved,
    p11e.DeviceMemory,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.NoSuchToken,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.WrappingKeyHandleInvalid,
    p11e.UnwrappingKeyHandleInvalid,
    p11e.UserNotLoggedIn,
    p11e.UserPinNotInitialized,
    p11e.GeneralError,
    p11e.OperationActive,  # an operation left active in the session: a new session
    NotInitialized,
)
# Errors opening a session that a retry with a reset may cure: a concurrent login to a
# SoftHSM token (a token file half written by another process), or a module loaded
# before a fork. The only ones a connect retries.
CONNECT_RACE_ERRORS = (
    p11e.GeneralError,
    p11e.NoSuchKey,
    p11e.TokenNotRecognised,
    NotInitialized,
)
PIN_ERRORS = (
    p11e.PinIncorrect,
    p11e.PinInvalid,
    p11e.PinLenRange,
    p11e.PinExpired,
    p11e.PinLocked,
)


def is_transient(e: p11e.PKCS11Error) -> bool:
    """Whether a fresh initialise and login may help after ``e``. Configuration errors (a
    missing mechanism, a bad template or parameter, a buffer the module keeps calling too
    small, an unmapped return value) are not: a reconnect would only repeat them."""
    # python-pkcs11 raises a bare PKCS11Error for CKR_CRYPTOKI_NOT_INITIALIZED (after a
    # fork), told apart only by its message; pkcs11_calls.py raises NotInitialized.
    return isinstance(e, TRANSIENT) or _bare_not_initialised(e)


def is_connect_race(e: p11e.PKCS11Error) -> bool:
    """Whether opening a session may succeed if tried again after a reset."""
    return isinstance(e, CONNECT_RACE_ERRORS) or _bare_not_initialised(e)


def _bare_not_initialised(e: p11e.PKCS11Error) -> bool:
    return type(e) is p11e.PKCS11Error and "not initialized" in str(e)


def describe(e: BaseException) -> str:
    """A one-line reason for a failed connect or provisioning step (none holds a secret)."""
    if isinstance(e, p11e.NoSuchToken):
        return "no token with the configured label (KMS_HSM_TOKEN_LABEL)"
    if isinstance(e, p11e.NoSuchKey):
        return "the KMS keys are not in the token: run `kms init`"
    if isinstance(e, PIN_ERRORS):
        return f"the HSM rejected the PIN ({type(e).__name__})"
    if isinstance(e, RuntimeError | OSError) and not isinstance(e, p11e.PKCS11Error):
        return f"cannot load the PKCS#11 module (KMS_PKCS11_MODULE): {e}"
    return type(e).__name__
