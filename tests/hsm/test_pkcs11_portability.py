"""What makes the backend portable across PKCS#11 implementations, on SoftHSM and on NSS
softokn (tests/hsm/conftest.py): the recorded wrap mechanism, IVs the HSM generates,
length handling that does not trust size queries, configuration errors that do not cause
reconnects, the liveness check before cached objects are used, the readiness round trip.

Some faults are injected by wrapping one function of the real module (``Calls`` in
kms/backends/hsm/pkcs11_calls.py); the module still does the cryptography."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute
from pkcs11 import exceptions as p11e

from hsm_config import templates
from kms.backends.hsm import Pkcs11Hsm, pkcs11_calls
from kms.errors import HsmUnavailable, IntegrityFailure
from kms.services.model import KekRef, WrappedKek

# A mechanism each module offers besides its profile's, and formats that differ from it:
# SoftHSM: RFC 3394 (_KEY_WRAP) vs RFC 5649 (_PAD); NSS: RFC 3394 + PKCS#7 (_PAD) vs
# RFC 5649 (_KWP).
_OTHER_WRAP = {
    "CKM_AES_KEY_WRAP_PAD": "CKM_AES_KEY_WRAP",
    "CKM_AES_KEY_WRAP_KWP": "CKM_AES_KEY_WRAP_PAD",
}


def _ref(key_id: str, wrapped: WrappedKek, version: int = 1) -> KekRef:
    return KekRef(key_id, version, wrapped.wrapped, wrapped.root_label, wrapped.wrap_mechanism)


def _sharing(hsm: Pkcs11Hsm, **changes: Any) -> Pkcs11Hsm:
    """A backend with another configuration on the same login (one login per process)."""
    hsm.check()
    other = Pkcs11Hsm(replace(hsm._config, **changes))
    other._lib, other._calls, other._conn = hsm._lib, hsm._calls, hsm._conn
    return other


@contextmanager
def _wrapped(hsm: Pkcs11Hsm, name: str, make: Callable[[Any], Any]) -> Iterator[list[Any]]:
    """Replace the module function ``name`` by ``make(original)`` for the block."""
    calls = hsm._calls
    assert calls is not None
    original = getattr(calls, name)
    seen: list[Any] = []
    setattr(calls, name, make(original))
    try:
        yield seen
    finally:
        setattr(calls, name, original)


def test_a_kek_opens_with_its_recorded_mechanism_after_a_profile_change(
    backend: Pkcs11Hsm,
) -> None:
    before = _sharing(backend, wrap_mechanism=_OTHER_WRAP[backend._config.wrap_mechanism])
    old = before.new_wrapped_kek()
    assert old.wrap_mechanism == before._config.wrap_mechanism
    old_ref = _ref("k-profile", old)
    iv, sealed = before.encrypt(old_ref, os.urandom(12), b"written before", b"aad")

    after = _sharing(backend)  # the profile's mechanism now wraps new KEKs
    new = after.new_wrapped_kek()
    assert new.wrap_mechanism == backend._config.wrap_mechanism != old.wrap_mechanism
    after.forget("k-profile")  # no cached object: the recorded mechanism must unwrap it
    assert after.decrypt(old_ref, iv, sealed, b"aad") == b"written before"
    iv2, sealed2 = after.encrypt(_ref("k-profile", new, 2), os.urandom(12), b"new", b"aad")
    assert after.decrypt(_ref("k-profile", new, 2), iv2, sealed2, b"aad") == b"new"

    # Without the record (the old blob read as the current profile's), it does not open.
    after.forget("k-profile")
    wrong = replace(old_ref, wrap_mechanism=backend._config.wrap_mechanism)
    with pytest.raises(IntegrityFailure):
        after.decrypt(wrong, iv, sealed, b"aad")


def test_an_unknown_recorded_mechanism_is_an_integrity_failure(backend: Pkcs11Hsm) -> None:
    ref = replace(_ref("k-unknown", backend.new_wrapped_kek()), wrap_mechanism="CKM_FOO")
    with pytest.raises(IntegrityFailure, match="unknown wrap mechanism"):
        backend.encrypt(ref, os.urandom(12), b"x", b"")


def _hsm_generates_iv(original: Any, ivs: list[bytes]) -> Any:
    """C_EncryptInit as AWS CloudHSM behaves: the caller's IV is ignored, the HSM writes
    its own into CK_GCM_PARAMS.pIv (here: random bytes, then the real module runs)."""

    def encrypt_init(session: int, mechanism: Any, key: int) -> int:
        mech = ctypes.cast(mechanism, ctypes.POINTER(pkcs11_calls.CK_MECHANISM)).contents
        params = ctypes.cast(mech.pParameter, ctypes.POINTER(pkcs11_calls.CK_GCM_PARAMS)).contents
        iv = os.urandom(params.ulIvLen)
        ctypes.memmove(params.pIv, iv, len(iv))
        ivs.append(iv)
        return int(original(session, mechanism, key))

    return encrypt_init


def test_an_iv_the_hsm_generates_is_read_back_and_stored(backend: Pkcs11Hsm) -> None:
    """The HSM-generated-IV path, on a module that does not generate IVs itself: a
    fault-injecting wrapper around the real C_EncryptInit writes its own IV."""
    hsm = _sharing(backend, gcm_iv="hsm")
    kek = _ref("k-hsm-iv", hsm.new_wrapped_kek())
    offered = bytes(12)
    ivs: list[bytes] = []
    with _wrapped(hsm, "C_EncryptInit", lambda orig: _hsm_generates_iv(orig, ivs)):
        iv, sealed = hsm.encrypt(kek, offered, b"patient record", b"aad")
        iv2, _ = hsm.encrypt(kek, offered, b"patient record", b"aad")
    assert iv == ivs[0] != offered and iv2 == ivs[1] != iv
    assert hsm.decrypt(kek, iv, sealed, b"aad") == b"patient record"
    with pytest.raises(IntegrityFailure):  # the offered IV is not the one used
        hsm.decrypt(kek, offered, sealed, b"aad")


def _under_reporting(original: Any, extra: list[int]) -> Any:
    """C_Encrypt answering the size query with the plaintext length (no tag), as NSS does
    for AES-GCM, and refusing a buffer smaller than the real output."""

    def encrypt(session: int, data: Any, size: int, out: Any, out_len: Any) -> int:
        length = ctypes.cast(out_len, ctypes.POINTER(ctypes.c_ulong)).contents
        if not out:
            length.value = size
            return 0
        if length.value < size + 16:
            extra.append(1)
            length.value = size + 16
            return pkcs11_calls.CKR_BUFFER_TOO_SMALL
        return int(original(session, data, size, out, out_len))

    return encrypt


def test_a_size_query_without_room_for_the_tag_is_not_trusted(backend: Pkcs11Hsm) -> None:
    kek = _ref("k-len", backend.new_wrapped_kek())
    too_small: list[int] = []
    with _wrapped(backend, "C_Encrypt", lambda orig: _under_reporting(orig, too_small)):
        iv, sealed = backend.encrypt(kek, os.urandom(12), b"x" * 32, b"")
    assert too_small == [] and len(sealed) == 48  # the buffer offered had room anyway
    assert backend.decrypt(kek, iv, sealed, b"") == b"x" * 32


def test_a_module_that_keeps_saying_too_small_is_refused_without_reconnecting(
    backend: Pkcs11Hsm,
) -> None:
    """Not retried (a configuration fault); the session, which the module left with an
    operation active, is dropped, so the next call works on a new one."""
    kek = _ref("k-small", backend.new_wrapped_kek())
    backend.encrypt(kek, os.urandom(12), b"warm", b"")
    calls: list[int] = []

    def always_small(original: Any) -> Any:
        def encrypt(session: int, data: Any, size: int, out: Any, out_len: Any) -> int:
            if out:
                calls.append(1)
                return pkcs11_calls.CKR_BUFFER_TOO_SMALL
            return int(original(session, data, size, out, out_len))

        return encrypt

    with (
        _wrapped(backend, "C_Encrypt", always_small),
        pytest.raises(HsmUnavailable) as caught,
    ):
        backend.encrypt(kek, os.urandom(12), b"x", b"")
    assert caught.value.detail == "BufferTooSmall"
    assert calls == [1, 1]  # the module's answer, once more with its new length; no retry
    assert backend._conn is None
    iv, sealed = backend.encrypt(kek, os.urandom(12), b"x", b"")
    assert backend.decrypt(kek, iv, sealed, b"") == b"x"


def test_a_missing_wrap_mechanism_is_a_clear_error_without_reconnect(backend: Pkcs11Hsm) -> None:
    """A vendor constant no module here offers: MechanismInvalid, once, no reconnect."""
    hsm = _sharing(backend, wrap_mechanism="0x80000171")
    conn = hsm._conn
    with pytest.raises(HsmUnavailable) as caught:
        hsm.new_wrapped_kek()
    assert caught.value.detail == "MechanismInvalid"
    assert hsm._conn is conn


def test_cached_objects_are_dropped_when_the_token_is_gone(backend: Pkcs11Hsm) -> None:
    """Past ``liveness_seconds`` a call first reads the root key in the token; when that
    fails the session and every cached KEK go, and the call is refused."""
    hsm = _sharing(backend, liveness_seconds=0.0)
    kek = _ref("k-live", hsm.new_wrapped_kek())
    iv, sealed = hsm.encrypt(kek, os.urandom(12), b"x", b"")
    conn = hsm._conn
    assert conn is not None and ("k-live", 1) in conn.keks

    class GoneRoot:  # the token object can no longer be read (the token was removed)
        def __getitem__(self, attribute: Attribute) -> Any:
            raise p11e.TokenNotPresent()

    real_root, conn.root = conn.root, GoneRoot()
    reconnects: list[int] = []
    hsm._connect = lambda reset: (
        reconnects.append(1)
        or (_ for _ in ()).throw(  # type: ignore[method-assign]
            HsmUnavailable(detail="connect failed: token gone")
        )
    )
    with pytest.raises(HsmUnavailable):
        hsm.decrypt(kek, iv, sealed, b"")  # served from the cache before this change
    assert hsm._conn is None and reconnects == [1]  # dropped; one reconnect attempt
    conn.root = real_root


def test_readiness_runs_a_gcm_round_trip_and_reuses_a_success(backend: Pkcs11Hsm) -> None:
    hsm = _sharing(backend)
    counted: list[int] = []

    def counting(original: Any) -> Any:
        def decrypt(*args: Any) -> int:
            counted.append(1)
            return int(original(*args))

        return decrypt

    with _wrapped(hsm, "C_Decrypt", counting):
        hsm.check()
        hsm.check()  # within a few seconds: reused
    assert counted == [1]  # one GCM round trip (no size query), reused the second time

    def failing(original: Any) -> Any:
        return lambda *args: 0x30  # CKR_DEVICE_ERROR

    hsm._ready_at = float("-inf")
    with _wrapped(hsm, "C_Decrypt", failing), pytest.raises(HsmUnavailable):
        hsm.check()


def test_root_key_refuses_an_extractable_unwrap_where_the_profile_says_so(
    backend: Pkcs11Hsm,
) -> None:
    """SoftHSM honours CKA_UNWRAP_TEMPLATE, so the root key carries one: a PIN holder
    cannot unwrap a KEK as extractable to read it out. NSS stores but ignores the
    template (nss profile: unwrap_template false; hsm_config/README.md says what remains)."""
    wrapped = backend.new_wrapped_kek()
    extractable = {
        **templates.KEK_UNWRAPPED,
        Attribute.EXTRACTABLE: True,
        Attribute.SENSITIVE: False,
    }

    def unwrap(c: Any) -> int:
        return pkcs11_calls.unwrap_key(
            c.calls, c.handle, backend._wrap, c.root.handle, wrapped.wrapped, extractable
        )

    if backend._config.unwrap_template:
        with pytest.raises(HsmUnavailable) as caught:
            backend._call(unwrap)
        assert caught.value.detail == "TemplateInconsistent"
    else:
        handle = backend._call(unwrap)  # what a PIN holder can do on this module
        backend._call(lambda c: pkcs11_calls.destroy(c.calls, c.handle, handle))


def test_known_answer_on_a_kek_unwrapped_with_the_recorded_mechanism(backend: Pkcs11Hsm) -> None:
    """A KEK the test knows, wrapped under the root key with the profile's mechanism,
    encrypts exactly as cryptography's AES-256-GCM does (the blob vectors hold)."""
    value = bytes(range(32, 64))

    def wrap_known(c: Any) -> bytes:
        key = c.session.create_object(
            {
                Attribute.CLASS: 4,  # CKO_SECRET_KEY
                Attribute.KEY_TYPE: 0x1F,  # CKK_AES
                Attribute.VALUE: value,
                Attribute.TOKEN: False,
                Attribute.EXTRACTABLE: True,
                Attribute.SENSITIVE: False,
            }
        )
        try:
            return pkcs11_calls.wrap_key(
                c.calls, c.handle, backend._wrap, c.root.handle, key.handle
            )
        finally:
            key.destroy()

    kek = KekRef(
        "k-kat-profile", 1, backend._call(wrap_known), "kms-root", backend._config.wrap_mechanism
    )
    iv = bytes(range(12))
    _, sealed = backend.encrypt(kek, iv, b"vector", b"aad")
    assert sealed == AESGCM(value).encrypt(iv, b"vector", b"aad")


def test_anchors_are_stored_read_listed_and_dropped_in_the_profile_form(
    backend: Pkcs11Hsm,
) -> None:
    """The audit and state anchors, on each module (NSS refuses private token data
    objects, so its profile keeps them as secret-key objects)."""
    label = f"kms-test-anchor-{os.urandom(4).hex()}"
    first, second = os.urandom(64), os.urandom(64)
    backend.add_anchor(label, first)
    backend.add_anchor(label, second)
    assert sorted(backend.anchor_values(label)) == sorted([first, second])
    assert sorted(backend.anchor_values(label, cached=True)) == sorted([first, second])
    assert label in backend.anchor_labels("kms-test-anchor-")
    backend.drop_anchor(label, first)
    assert backend.anchor_values(label, cached=True) == [second]  # a destroyed one is seen
    backend.drop_anchor(label, second)
    assert backend.anchor_values(label) == []
    assert label not in backend.anchor_labels("kms-test-anchor-")


def _writes_iv(original: Any, iv_for: Callable[[int], bytes]) -> Any:
    """C_EncryptInit of a module that writes ``iv_for(call number)`` into pIv (its
    length may exceed the IV asked for) before the real module runs with it."""
    count = [0]

    def encrypt_init(session: int, mechanism: Any, key: int) -> int:
        mech = ctypes.cast(mechanism, ctypes.POINTER(pkcs11_calls.CK_MECHANISM)).contents
        params = ctypes.cast(mech.pParameter, ctypes.POINTER(pkcs11_calls.CK_GCM_PARAMS)).contents
        iv = iv_for(count[0])
        count[0] += 1
        ctypes.memmove(params.pIv, iv, len(iv))
        return int(original(session, mechanism, key))

    return encrypt_init


@pytest.mark.parametrize(
    ("source", "iv_for", "why"),
    [
        ("hsm", lambda n: bytes(12), "zero"),
        ("hsm", lambda n: b"\x01" * 12, "repeated"),  # the second one repeats the first
        ("caller", lambda n: os.urandom(12), "replaced"),
        ("caller", lambda n: os.urandom(16), "longer"),
    ],
    ids=["hsm-zero", "hsm-repeated", "caller-replaced", "iv-longer-than-asked"],
)
def test_a_gcm_iv_against_the_configured_source_is_never_used(
    backend: Pkcs11Hsm, source: str, iv_for: Callable[[int], bytes], why: str
) -> None:
    """GCM must never reuse an IV: a module that writes a zero or repeated IV, replaces
    the caller's, or writes more than 12 bytes is refused, and nothing is returned."""
    hsm = _sharing(backend, gcm_iv=source)
    kek = _ref(f"k-iv-{why}", hsm.new_wrapped_kek())
    with _wrapped(hsm, "C_EncryptInit", lambda orig: _writes_iv(orig, iv_for)):
        if why == "repeated":
            hsm.encrypt(kek, os.urandom(12), b"first", b"")  # the IV is new: served
        with pytest.raises(HsmUnavailable) as caught:
            hsm.encrypt(kek, os.urandom(12), b"second", b"")
    assert str(caught.value.detail).startswith("ModuleMisbehaved")


def test_an_hsm_iv_that_is_not_written_back_is_refused(backend: Pkcs11Hsm) -> None:
    """With ``gcm_iv = hsm`` a module that keeps the offered IV has not said which IV it
    used: the blob would not open, so nothing is returned."""
    hsm = _sharing(backend, gcm_iv="hsm")
    kek = _ref("k-iv-silent", hsm.new_wrapped_kek())
    with pytest.raises(HsmUnavailable) as caught:
        hsm.encrypt(kek, os.urandom(12), b"x", b"")  # the real module writes nothing back
    assert "missing, zero or repeated" in str(caught.value.detail)


def test_a_module_claiming_more_output_than_the_buffer_is_refused(backend: Pkcs11Hsm) -> None:
    kek = _ref("k-overrun", backend.new_wrapped_kek())
    backend.encrypt(kek, os.urandom(12), b"warm", b"")

    def overrun(original: Any) -> Any:
        def encrypt(session: int, data: Any, size: int, out: Any, out_len: Any) -> int:
            rv = int(original(session, data, size, out, out_len))
            if out and rv == 0:
                ctypes.cast(out_len, ctypes.POINTER(ctypes.c_ulong)).contents.value = 1 << 20
            return rv

        return encrypt

    with _wrapped(backend, "C_Encrypt", overrun), pytest.raises(HsmUnavailable) as caught:
        backend.encrypt(kek, os.urandom(12), b"x", b"")
    assert "more output than the buffer" in str(caught.value.detail)
    assert backend._conn is None  # dropped, not retried
    iv, sealed = backend.encrypt(kek, os.urandom(12), b"x", b"")  # a new session works
    assert backend.decrypt(kek, iv, sealed, b"") == b"x"


def test_after_a_failed_connect_calls_fail_at_once_for_a_moment(backend: Pkcs11Hsm) -> None:
    """No reconnect storm: while the HSM is down each call does not finalize, initialize
    and log in again; the first call after the back-off does."""
    hsm = _sharing(backend)
    hsm._conn = None
    attempts: list[int] = []

    def down(reset: bool) -> Any:
        attempts.append(1)
        raise HsmUnavailable(detail="connect failed: injected")

    hsm._connect = down  # type: ignore[method-assign]
    for _ in range(5):
        with pytest.raises(HsmUnavailable):
            hsm.check()
    assert attempts == [1]
    hsm._retry_after = 0.0  # the back-off is over
    with pytest.raises(HsmUnavailable):
        hsm.check()
    assert attempts == [1, 1]
