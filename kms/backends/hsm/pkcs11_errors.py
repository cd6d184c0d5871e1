"""What each PKCS#11 error means to the backend: bad data, worth a reconnect, or a
rejected PIN. ``Pkcs11Hsm`` (pkcs11_hsm.py) turns them into IntegrityFailure, a retry
after reconnecting, or HsmUnavailable."""

from __future__ import annotations

from pkcs11 import exceptions as p11e

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
)
PIN_ERRORS = (
    p11e.PinIncorrect,
    p11e.PinInvalid,
    p11e.PinLenRange,
    p11e.PinExpired,
    p11e.PinLocked,
)


def is_transient(e: p11e.PKCS11Error) -> bool:
    """Whether a fresh initialise and login may help after ``e``."""
    # A bare PKCS11Error carries a return value python-pkcs11 has no class for, such as
    # CKR_CRYPTOKI_NOT_INITIALIZED after a fork: worth a reconnect.
    return isinstance(e, TRANSIENT) or type(e) is p11e.PKCS11Error
