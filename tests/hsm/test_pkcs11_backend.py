"""The PKCS#11 backend against two real PKCS#11 implementations: SoftHSM (reset_on_fork
= true) and NSS softokn through p11-kit's proxy (tests/hsm/conftest.py). Every test that
takes ``backend`` runs on both."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11e

from hsm_config import templates
from kms.backends.hsm import Pkcs11Hsm, pkcs11_calls, pkcs11_session
from kms.errors import HsmUnavailable, IntegrityFailure
from kms.formats import blob as blobfmt
from kms.services.model import KekRef


def _kek(hsm: Pkcs11Hsm, key_id: str, version: int = 1) -> KekRef:
    wrapped = hsm.new_wrapped_kek()
    return KekRef(key_id, version, wrapped.wrapped, wrapped.root_label, wrapped.wrap_mechanism)


def _session_object(c, handle: int):  # type: ignore[no-untyped-def]
    """python-pkcs11's object for a session object handle (None if it is gone)."""
    found = c.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: False})
    return next((o for o in found if o.handle == handle), None)


def test_root_key_is_sensitive_non_extractable_wrap_only(backend: Pkcs11Hsm) -> None:
    hsm = backend

    def attrs(c):  # type: ignore[no-untyped-def]
        root = c.root
        with pytest.raises(p11e.AttributeSensitive):
            _ = root[Attribute.VALUE]
        return {
            a: root[a]
            for a in (
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.NEVER_EXTRACTABLE,
                Attribute.WRAP,
                Attribute.UNWRAP,
                Attribute.ENCRYPT,
                Attribute.DECRYPT,
            )
        }

    got = hsm._call(attrs)
    assert got == {
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.NEVER_EXTRACTABLE: True,
        Attribute.WRAP: True,
        Attribute.UNWRAP: True,
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
    }


def test_kek_in_use_is_non_extractable(backend: Pkcs11Hsm) -> None:
    hsm = backend
    kek = _kek(hsm, "k-attr")
    hsm.encrypt(kek, os.urandom(12), b"x", b"")

    def attrs(c):  # type: ignore[no-untyped-def]
        key = _session_object(c, c.keks[("k-attr", 1)])
        with pytest.raises(p11e.AttributeSensitive):
            _ = key[Attribute.VALUE]
        return key[Attribute.EXTRACTABLE], key[Attribute.SENSITIVE], key[Attribute.TOKEN]

    assert hsm._call(attrs) == (False, True, False)


def _import_known_kek(hsm: Pkcs11Hsm, value: bytes) -> bytes:
    """Wrap a KEK whose value the test knows, by importing it into the HSM (test only)."""

    def op(c):  # type: ignore[no-untyped-def]
        key = c.session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: value,
                Attribute.TOKEN: False,
                Attribute.EXTRACTABLE: True,
                Attribute.SENSITIVE: False,
            }
        )
        try:
            return pkcs11_calls.wrap_key(c.calls, c.handle, hsm._wrap, c.root.handle, key.handle)
        finally:
            key.destroy()

    return hsm._call(op)


def test_blob_is_standard_aes_gcm_with_the_documented_aad(backend: Pkcs11Hsm) -> None:
    """Known-answer interop: the HSM's output equals cryptography's AES-256-GCM."""
    hsm = backend
    value = bytes(range(32))
    wrapped = _import_known_kek(hsm, value)
    kek = KekRef("kat-key", 3, wrapped, "kms-root", hsm._config.wrap_mechanism)
    iv, dek, ctx = bytes(12), b"\x42" * 32, {"tenant": "7"}
    header = blobfmt.header_for("kat-key", 3, iv)
    used, ct = hsm.encrypt(kek, iv, dek, header.aad(ctx))
    assert used == iv
    assert ct == AESGCM(value).encrypt(iv, dek, header.aad(ctx))
    assert hsm.decrypt(kek, iv, ct, header.aad(ctx)) == dek
    with pytest.raises(IntegrityFailure):
        hsm.decrypt(kek, iv, ct, header.aad({"tenant": "8"}))


def test_unwrap_under_wrong_root_is_an_integrity_failure(backend: Pkcs11Hsm) -> None:
    hsm = backend
    bad = KekRef("k-bad", 1, os.urandom(40), "kms-root", hsm._config.wrap_mechanism)
    with pytest.raises(IntegrityFailure):
        hsm.encrypt(bad, os.urandom(12), b"x", b"")
    hsm.check()  # and the HSM is still fine


def test_kek_cache_is_bounded_and_evicted_objects_are_destroyed(backend: Pkcs11Hsm) -> None:
    hsm = backend
    small = Pkcs11Hsm(replace(hsm._config, kek_cache_size=2))
    keks = [_kek(hsm, f"k{i}") for i in range(3)]
    small._lib, small._calls, small._conn = hsm._lib, hsm._calls, hsm._conn  # share the login
    small.encrypt(keks[0], os.urandom(12), b"x", b"")
    conn = small._conn
    assert conn is not None
    first = conn.keks[("k0", 1)]
    for kek in keks[1:]:
        small.encrypt(kek, os.urandom(12), b"x", b"")
    assert list(conn.keks) == [("k1", 1), ("k2", 1)]
    assert hsm._call(lambda c: _session_object(c, first)) is None  # destroyed in the HSM


def test_audit_signing_key_signs_verifiably(backend: Pkcs11Hsm) -> None:
    hsm = backend
    pub = serialization.load_pem_public_key(hsm.audit_public_key_pem())
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"checkpoint")
    pub.verify(hsm.sign_digest(digest.finalize()), b"checkpoint", ec.ECDSA(hashes.SHA256()))


def test_forked_child_reinitialises_and_parent_keeps_working(backend: Pkcs11Hsm) -> None:
    """With reset_on_fork = true the inherited state is dead in the child; the backend
    notices the new pid, re-initialises and logs in again."""
    hsm = backend
    kek = _kek(hsm, "k-fork")
    _, ct = hsm.encrypt(kek, bytes(12), b"secret", b"aad")
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            code = 0 if hsm.decrypt(kek, bytes(12), ct, b"aad") == b"secret" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert hsm.decrypt(kek, bytes(12), ct, b"aad") == b"secret"


def test_a_rejected_pin_is_never_tried_again(hsm: Pkcs11Hsm) -> None:
    """Real HSMs lock a partition after a few bad logins: one rejection, no retries.

    SoftHSM only: through p11-kit, NSS keeps the login other tests' sessions made in this
    process across the forked child's finalize, so the child cannot make a fresh login
    (tests/e2e/test_nss_flow.py checks a wrong PIN on NSS from a fresh process)."""
    pid = os.fork()  # in a child, so the failed logins cannot disturb this process
    if pid == 0:
        code = 3
        try:
            wrong = Pkcs11Hsm(replace(hsm._config, pin="0000"))
            wrong._lib, wrong._calls = hsm._lib, hsm._calls
            logins = []
            real_login = pkcs11_session.login
            pkcs11_session.login = lambda token, pin: logins.append(1) or real_login(token, pin)
            outcomes = []
            for _ in range(3):
                try:
                    wrong.check()
                    outcomes.append("ok")
                except HsmUnavailable as e:
                    outcomes.append(e.detail or "")
            code = 0 if len(logins) == 1 and all("PIN" in o for o in outcomes) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_key_templates_never_allow_extraction_of_long_lived_keys() -> None:
    for template in (
        templates.ROOT_KEY,
        templates.KEK_IN_USE,
        templates.AUDIT_PRIVATE,
        templates.INTEGRITY_KEY,
    ):
        assert template[Attribute.SENSITIVE] is True
        assert template[Attribute.EXTRACTABLE] is False


def test_integrity_mac_is_hmac_sha256_in_the_hsm(backend: Pkcs11Hsm) -> None:
    hsm = backend
    first = hsm.mac(b"row")
    assert len(first) == 32 and hsm.mac(b"row") == first and hsm.mac(b"rox") != first

    def attrs(c):  # type: ignore[no-untyped-def]
        key = c.session.get_key(object_class=ObjectClass.SECRET_KEY, label="kms-integrity")
        with pytest.raises(p11e.AttributeSensitive):
            _ = key[Attribute.VALUE]
        return key[Attribute.EXTRACTABLE], key[Attribute.TOKEN]

    assert hsm._call(attrs) == (False, True)


def test_forget_destroys_the_cached_objects_of_that_key_only(backend: Pkcs11Hsm) -> None:
    hsm = backend
    v1, v2, other = _kek(hsm, "k-forget", 1), _kek(hsm, "k-forget", 2), _kek(hsm, "k-keep")
    sealed = {kek: hsm.encrypt(kek, bytes(12), b"dek", b"aad")[1] for kek in (v1, v2, other)}
    conn = hsm._conn
    assert conn is not None
    cached = [conn.keks[("k-forget", 1)], conn.keks[("k-forget", 2)]]

    hsm.forget("k-forget")

    assert [i for i in conn.keks if i[0] == "k-forget"] == []
    assert ("k-keep", 1) in conn.keks
    for handle in cached:  # destroyed in the HSM, not only dropped from the dict
        assert hsm._call(lambda c, h=handle: _session_object(c, h)) is None
    hsm.forget("k-forget")  # idempotent
    misses = hsm.cache_stats()["kek_cache_misses"]
    assert hsm.decrypt(v1, bytes(12), sealed[v1], b"aad") == b"dek"  # unwrapped again
    assert hsm.cache_stats()["kek_cache_misses"] == misses + 1
    assert ("k-forget", 1) in conn.keks
    assert hsm.decrypt(other, bytes(12), sealed[other], b"aad") == b"dek"
    assert hsm.cache_stats()["kek_cache_misses"] == misses + 1  # still cached
