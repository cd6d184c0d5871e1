"""The PKCS#11 calls the backend makes through ctypes rather than python-pkcs11.

python-pkcs11 0.10.1 is used for everything else (sessions, search, attributes, random,
signatures). These few calls go straight to the function list python-pkcs11 itself uses,
on the session and object handles it opened, because the binding cannot do them right:

- **Length handling.** The binding trusts a module's size query. NSS softokn answers the
  ``C_Encrypt`` query for AES-GCM with the plaintext length (no room for the tag) and
  under-reports ``C_WrapKey`` for KWP, so the binding's second call fails with
  ``CKR_BUFFER_TOO_SMALL``. Here there is no size query: the output buffer is the most the
  mechanism can produce, and a ``CKR_BUFFER_TOO_SMALL`` is retried once with the length
  the module then reports, capped (the operation stays active after that code, PKCS#11
  v2.40 section 5.2).
- **HSM-generated GCM IVs.** AWS CloudHSM (and Luna in some modes) ignores the caller's IV
  and writes its own into ``CK_GCM_PARAMS.pIv``. The IV buffer is ours and is read back
  after the call, so the IV the HSM used is the one stored in the blob.
- **Any wrap mechanism.** ``CKM_AES_KEY_WRAP``, ``_PAD``, ``_KWP`` or a vendor constant,
  by number.
- **Nested templates.** ``CKA_UNWRAP_TEMPLATE`` (an attribute whose value is an attribute
  array) for the root key.

The function list must be the binding's own, not a fresh one from the module's
``C_GetFunctionList``: p11-kit's proxy hands each caller a separate instance with its own
initialisation and sessions. python-pkcs11 does not expose it, so ``Calls`` reads the
pointer from the binding's ``lib`` object (the first field after the object header in
0.10.x) and proves it right before use: ``C_GetInfo`` through it must name the same
library the binding reports. A binding whose layout differs is refused with a clear
error, never guessed at (tests/hsm/test_pkcs11_backend.py runs this on both modules).

Every function raises a ``pkcs11.exceptions`` class for a failed call (``error()``), so
pkcs11_errors.py classifies them like the binding's own. None of them takes a lock:
``Pkcs11Hsm._call`` holds the process lock around every call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from pkcs11 import Mechanism
from pkcs11 import exceptions as p11e

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG
CKR_OK = 0x0
CKR_BUFFER_TOO_SMALL = 0x150
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKF_ARRAY_ATTRIBUTE = 0x40000000
CKA_UNWRAP_TEMPLATE = CKF_ARRAY_ATTRIBUTE | 0x212
GCM_TAG_BYTES = 16
_WRAP_OVERHEAD = 16  # the most any AES key-wrap variant adds (RFC 3394 + PKCS#7 padding)
_SLACK = 64  # room offered beyond the expected output, and beyond the IV


class NotInitialized(p11e.PKCS11Error):
    """CKR_CRYPTOKI_NOT_INITIALIZED: the module lost its state (a fork); worth a reconnect."""


class BufferTooSmall(p11e.PKCS11Error):
    """CKR_BUFFER_TOO_SMALL twice in a row: the module keeps under-reporting; a
    configuration fault, not worth a reconnect."""


class ModuleMisbehaved(p11e.PKCS11Error):
    """The module answered what PKCS#11 does not allow: more output than the buffer held,
    an output of the wrong length, an IV longer than asked for or (pkcs11_hsm.py) a GCM
    IV against the configured source. Never retried."""


class KeyFunctionNotPermitted(p11e.PKCS11Error):
    """CKR_KEY_FUNCTION_NOT_PERMITTED: a key's attributes forbid the call (a vendor
    ceremony made it without CKA_UNWRAP, say): configuration, not bad data."""


_ERRORS: dict[int, type[p11e.PKCS11Error]] = {
    0x5: p11e.GeneralError,
    0x6: p11e.FunctionFailed,
    0x7: p11e.ArgumentsBad,
    0x12: p11e.AttributeTypeInvalid,
    0x13: p11e.AttributeValueInvalid,
    0x20: p11e.DataInvalid,
    0x21: p11e.DataLenRange,
    0x30: p11e.DeviceError,
    0x31: p11e.DeviceMemory,
    0x32: p11e.DeviceRemoved,
    0x40: p11e.EncryptedDataInvalid,
    0x41: p11e.EncryptedDataLenRange,
    0x54: p11e.FunctionNotSupported,
    0x60: p11e.KeyHandleInvalid,
    0x62: p11e.KeySizeRange,
    0x63: p11e.KeyTypeInconsistent,
    0x68: KeyFunctionNotPermitted,
    0x69: p11e.KeyNotWrappable,
    0x6A: p11e.KeyUnextractable,
    0x70: p11e.MechanismInvalid,
    0x71: p11e.MechanismParamInvalid,
    0x82: p11e.ObjectHandleInvalid,
    0x90: p11e.OperationActive,
    0x91: p11e.OperationNotInitialized,
    0xB0: p11e.SessionClosed,
    0xB3: p11e.SessionHandleInvalid,
    0xB5: p11e.SessionReadOnly,
    0xD0: p11e.TemplateIncomplete,
    0xD1: p11e.TemplateInconsistent,
    0xE0: p11e.TokenNotPresent,
    0xE1: p11e.TokenNotRecognised,
    0xF0: p11e.UnwrappingKeyHandleInvalid,
    0xF1: p11e.UnwrappingKeySizeRange,
    0xF2: p11e.UnwrappingKeyTypeInconsistent,
    0x101: p11e.UserNotLoggedIn,
    0x110: p11e.WrappedKeyInvalid,
    0x112: p11e.WrappedKeyLenRange,
    0x113: p11e.WrappingKeyHandleInvalid,
    0x114: p11e.WrappingKeySizeRange,
    0x115: p11e.WrappingKeyTypeInconsistent,
    CKR_BUFFER_TOO_SMALL: BufferTooSmall,
    CKR_CRYPTOKI_NOT_INITIALIZED: NotInitialized,
}


def error(rv: int) -> p11e.PKCS11Error:
    """The exception for a PKCS#11 return value (a bare PKCS11Error naming it if unmapped)."""
    cls = _ERRORS.get(rv)
    return cls() if cls else p11e.PKCS11Error(f"CKR 0x{rv:08x}")


def _check(rv: int) -> None:
    if rv != CKR_OK:
        raise error(rv)


class CK_MECHANISM(ctypes.Structure):
    _fields_ = [
        ("mechanism", CK_ULONG),
        ("pParameter", ctypes.c_void_p),
        ("ulParameterLen", CK_ULONG),
    ]


class CK_GCM_PARAMS(ctypes.Structure):
    _fields_ = [
        ("pIv", ctypes.c_void_p),
        ("ulIvLen", CK_ULONG),
        ("ulIvBits", CK_ULONG),
        ("pAAD", ctypes.c_void_p),
        ("ulAADLen", CK_ULONG),
        ("ulTagBits", CK_ULONG),
    ]


class CK_ATTRIBUTE(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", CK_ULONG)]


# The order of CK_FUNCTION_LIST (PKCS#11 v2.40 pkcs11f.h) up to the last function used.
_FUNCTION_ORDER = (
    "C_Initialize C_Finalize C_GetInfo C_GetFunctionList C_GetSlotList C_GetSlotInfo "
    "C_GetTokenInfo C_GetMechanismList C_GetMechanismInfo C_InitToken C_InitPIN C_SetPIN "
    "C_OpenSession C_CloseSession C_CloseAllSessions C_GetSessionInfo C_GetOperationState "
    "C_SetOperationState C_Login C_Logout C_CreateObject C_CopyObject C_DestroyObject "
    "C_GetObjectSize C_GetAttributeValue C_SetAttributeValue C_FindObjectsInit C_FindObjects "
    "C_FindObjectsFinal C_EncryptInit C_Encrypt C_EncryptUpdate C_EncryptFinal C_DecryptInit "
    "C_Decrypt C_DecryptUpdate C_DecryptFinal C_DigestInit C_Digest C_DigestUpdate "
    "C_DigestKey C_DigestFinal C_SignInit C_Sign C_SignUpdate C_SignFinal C_SignRecoverInit "
    "C_SignRecover C_VerifyInit C_Verify C_VerifyUpdate C_VerifyFinal C_VerifyRecoverInit "
    "C_VerifyRecover C_DigestEncryptUpdate C_DecryptDigestUpdate C_SignEncryptUpdate "
    "C_DecryptVerifyUpdate C_GenerateKey C_GenerateKeyPair C_WrapKey C_UnwrapKey"
)
_FUNCTIONS = _FUNCTION_ORDER.split()


class CK_FUNCTION_LIST(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [
        (name, ctypes.c_void_p) for name in _FUNCTIONS
    ]


_P = ctypes.c_void_p
_PROTOTYPES: dict[str, tuple[Any, ...]] = {
    "C_EncryptInit": (CK_ULONG, _P, CK_ULONG),
    "C_Encrypt": (CK_ULONG, _P, CK_ULONG, _P, _P),
    "C_DecryptInit": (CK_ULONG, _P, CK_ULONG),
    "C_Decrypt": (CK_ULONG, _P, CK_ULONG, _P, _P),
    "C_WrapKey": (CK_ULONG, _P, CK_ULONG, CK_ULONG, _P, _P),
    "C_UnwrapKey": (CK_ULONG, _P, CK_ULONG, _P, CK_ULONG, _P, CK_ULONG, _P),
    "C_GenerateKey": (CK_ULONG, _P, _P, CK_ULONG, _P),
    "C_DestroyObject": (CK_ULONG, CK_ULONG),
}


class CK_INFO(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        ("manufacturerID", ctypes.c_char * 32),
        ("flags", CK_ULONG),
        ("libraryDescription", ctypes.c_char * 32),
        ("libMajor", ctypes.c_ubyte),
        ("libMinor", ctypes.c_ubyte),
    ]


class BindingMismatch(RuntimeError):
    """python-pkcs11's object layout is not the one this module reads."""


class Calls:
    """The module's functions this file uses, as attributes named like the C functions.
    A test may replace one with a wrapper that calls the original (to inject a fault or
    behave like another vendor's module); nothing else should."""

    C_EncryptInit: Callable[..., int]
    C_Encrypt: Callable[..., int]
    C_DecryptInit: Callable[..., int]
    C_Decrypt: Callable[..., int]
    C_WrapKey: Callable[..., int]
    C_UnwrapKey: Callable[..., int]
    C_GenerateKey: Callable[..., int]
    C_DestroyObject: Callable[..., int]

    def __init__(self, binding_lib: Any) -> None:
        """The functions of the list python-pkcs11's initialised ``binding_lib`` uses.
        Raises BindingMismatch if the pointer read does not lead to that library."""
        version = metadata.version("python-pkcs11")
        if not version.startswith("0.10."):
            raise BindingMismatch(
                f"python-pkcs11 {version}: this KMS reads the binding's function list as "
                "0.10.x lays it out (pyproject.toml pins it)"
            )
        address = ctypes.c_void_p.from_address(id(binding_lib) + object.__basicsize__).value
        if not address:
            raise BindingMismatch("python-pkcs11 holds no function list")
        table = ctypes.cast(address, ctypes.POINTER(CK_FUNCTION_LIST)).contents
        info = CK_INFO()
        get_info = ctypes.CFUNCTYPE(CK_RV, _P)(table.C_GetInfo)
        rv = get_info(ctypes.byref(info))
        if rv == CKR_CRYPTOKI_NOT_INITIALIZED:
            raise NotInitialized()  # loaded before a fork: the caller re-initialises
        name = info.manufacturerID.decode("utf-8", "replace").rstrip()
        if rv != CKR_OK or name != str(binding_lib.manufacturer_id).rstrip():
            raise BindingMismatch(
                "cannot reach python-pkcs11's PKCS#11 function list (a python-pkcs11 "
                "version this KMS was not tested with?)"
            )
        for name, args in _PROTOTYPES.items():
            address = getattr(table, name)
            if not address:
                raise p11e.FunctionNotSupported(f"{name} missing from the function list")
            setattr(self, name, ctypes.CFUNCTYPE(CK_RV, *args)(address))


def _mechanism(mech: int, param: ctypes.Structure | None = None) -> CK_MECHANISM:
    if param is None:
        return CK_MECHANISM(mech, None, 0)
    return CK_MECHANISM(mech, ctypes.cast(ctypes.pointer(param), _P), ctypes.sizeof(param))


def _sized_output(call: Callable[[Any, Any], int], at_least: int, most: int) -> bytes:
    """Run a single-part call that writes output into a buffer of ``at_least`` bytes (the
    most the mechanism can produce: no size query, whose answer is not trusted anyway);
    if the module calls it too small, once more with its answer, never more than
    ``most``. A module that claims to have written more than the buffer held is refused."""
    length = CK_ULONG(0)
    size = at_least
    for _ in range(2):
        out = ctypes.create_string_buffer(size)
        length.value = size
        rv = call(out, ctypes.byref(length))
        if rv == CKR_OK:
            if length.value > size:
                raise ModuleMisbehaved("the module reported more output than the buffer held")
            return out.raw[: length.value]
        if rv != CKR_BUFFER_TOO_SMALL:
            raise error(rv)
        size = min(max(length.value, at_least), most)  # the module says how much it needs
    raise BufferTooSmall()


def _gcm_params(iv: bytes, aad: bytes) -> tuple[CK_GCM_PARAMS, Any, Any]:
    """GCM parameters with an IV buffer larger than the IV (a module that writes a longer
    IV than asked writes into our slack, and is caught) and the buffers they point to."""
    iv_buf = ctypes.create_string_buffer(iv, len(iv) + _SLACK)
    aad_buf = ctypes.create_string_buffer(aad, len(aad))
    params = CK_GCM_PARAMS(
        ctypes.cast(iv_buf, _P), len(iv), 8 * len(iv), ctypes.cast(aad_buf, _P), len(aad), 128
    )
    return params, iv_buf, aad_buf


def gcm_encrypt(
    calls: Calls, session: int, key: int, iv: bytes, plaintext: bytes, aad: bytes
) -> tuple[bytes, bytes]:
    """AES-GCM (128-bit tag) under ``key``: returns (the IV the module used, ciphertext ||
    tag). ``iv`` goes in the IV buffer; a module that generates its own overwrites it.
    ModuleMisbehaved if the output is not exactly plaintext + tag long or the module
    wrote an IV longer than ``iv``."""
    params, iv_buf, _aad = _gcm_params(iv, aad)
    mech = _mechanism(Mechanism.AES_GCM, params)
    _check(calls.C_EncryptInit(session, ctypes.byref(mech), key))
    data = ctypes.create_string_buffer(plaintext, len(plaintext))
    expected = len(plaintext) + GCM_TAG_BYTES
    sealed = _sized_output(
        lambda out, n: calls.C_Encrypt(session, data, len(plaintext), out, n),
        expected,
        expected + _SLACK,
    )
    if any(iv_buf.raw[len(iv) :]):
        raise ModuleMisbehaved(f"the module wrote a GCM IV longer than {len(iv)} bytes")
    if len(sealed) != expected:
        raise ModuleMisbehaved("AES-GCM output is not ciphertext || 16-byte tag")
    return iv_buf.raw[: len(iv)], sealed


def gcm_decrypt(
    calls: Calls, session: int, key: int, iv: bytes, sealed: bytes, aad: bytes
) -> bytes:
    """AES-GCM decrypt of ciphertext || tag; a bad tag raises the module's error, an
    output that is not exactly the ciphertext's length ModuleMisbehaved."""
    params, _iv, _aad = _gcm_params(iv, aad)
    mech = _mechanism(Mechanism.AES_GCM, params)
    _check(calls.C_DecryptInit(session, ctypes.byref(mech), key))
    data = ctypes.create_string_buffer(sealed, len(sealed))
    opened = _sized_output(
        lambda out, n: calls.C_Decrypt(session, data, len(sealed), out, n),
        len(sealed),  # some modules ask for room for the tag too
        len(sealed) + _SLACK,
    )
    if len(opened) != len(sealed) - GCM_TAG_BYTES:
        raise ModuleMisbehaved("AES-GCM decrypt output is not the ciphertext's length")
    return opened


def wrap_key(calls: Calls, session: int, mechanism: int, wrapping: int, key: int) -> bytes:
    """``key`` wrapped under ``wrapping`` with the AES key-wrap ``mechanism`` (no IV
    parameter: every variant's default)."""
    mech = _mechanism(mechanism)
    return _sized_output(
        lambda out, n: calls.C_WrapKey(session, ctypes.byref(mech), wrapping, key, out, n),
        32 + _WRAP_OVERHEAD,
        32 + _WRAP_OVERHEAD + _SLACK,
    )


class Template:
    """A CK_ATTRIBUTE array built from {attribute: value}, kept alive with its buffers.
    Values: bool (CK_BBOOL), int (CK_ULONG), bytes or str (byte string), or a mapping (a
    nested template, for CKA_UNWRAP_TEMPLATE)."""

    def __init__(self, attrs: Mapping[Any, Any]) -> None:
        self._keep: list[Any] = []
        self.array = (CK_ATTRIBUTE * len(attrs))()
        for i, (kind, value) in enumerate(attrs.items()):
            buf, size = self._value(value)
            self.array[i] = CK_ATTRIBUTE(int(kind), buf, size)

    def _value(self, value: Any) -> tuple[Any, int]:
        if isinstance(value, bool):
            c: Any = ctypes.c_ubyte(1 if value else 0)
        elif isinstance(value, int):
            c = CK_ULONG(value)
        elif isinstance(value, str | bytes):
            raw = value.encode() if isinstance(value, str) else value
            c = ctypes.create_string_buffer(raw, len(raw))
        elif isinstance(value, Mapping):
            nested = Template(value)
            self._keep.append(nested)
            c = nested.array
        else:
            raise TypeError(f"unsupported attribute value {type(value).__name__}")
        self._keep.append(c)
        return ctypes.cast(ctypes.pointer(c), _P), ctypes.sizeof(c)

    def __len__(self) -> int:
        return len(self.array)


def unwrap_key(
    calls: Calls,
    session: int,
    mechanism: int,
    unwrapping: int,
    wrapped: bytes,
    template: Mapping[Any, Any],
) -> int:
    """Unwrap ``wrapped`` under ``unwrapping`` into a new object made from ``template``;
    returns its handle."""
    mech = _mechanism(mechanism)
    tpl = Template(template)
    data = ctypes.create_string_buffer(wrapped, len(wrapped))
    handle = CK_ULONG(0)
    _check(
        calls.C_UnwrapKey(
            session,
            ctypes.byref(mech),
            unwrapping,
            data,
            len(wrapped),
            tpl.array,
            len(tpl),
            ctypes.byref(handle),
        )
    )
    return handle.value


def generate_key(calls: Calls, session: int, mechanism: int, template: Mapping[Any, Any]) -> int:
    """C_GenerateKey with ``template`` (which may nest an unwrap template); the handle."""
    mech = _mechanism(mechanism)
    tpl = Template(template)
    handle = CK_ULONG(0)
    _check(
        calls.C_GenerateKey(session, ctypes.byref(mech), tpl.array, len(tpl), ctypes.byref(handle))
    )
    return handle.value


def destroy(calls: Calls, session: int, handle: int) -> None:
    """C_DestroyObject."""
    _check(calls.C_DestroyObject(session, handle))
