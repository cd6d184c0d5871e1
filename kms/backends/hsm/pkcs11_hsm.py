"""The Hsm port over PKCS#11: every call a server makes into the HSM goes through
``Pkcs11Hsm._call``.

Process and thread rules:
- The module is initialised lazily in the process that uses it (the pid is checked on
  every call), never in the gunicorn master; state inherited through fork() is dropped.
- python-pkcs11 initialises modules without OS locking and releases the GIL inside calls,
  so one process-wide lock (shared by every instance; renewed in a forked child)
  serialises every PKCS#11 call.
- One logged-in read-write session per process lives as long as the process; the root key handle and
  unwrapped KEK handles (bounded LRU, destroyed on eviction) are cached on it.
- A call failing with a session, token or device error is retried once after a reconnect
  (finalize, initialize, log in again); if that fails too the caller gets HsmUnavailable
  and the next call reconnects, so the service recovers by itself when the HSM comes back.
  Other PKCS#11 errors are HsmUnavailable at once, without reconnecting (pkcs11_errors.py
  says which errors are which). Each failed
  attempt and each failed connect is counted in ``kms_hsm_errors_total`` (kms/metrics.py).
- A rejected PIN is never tried again by this process (real HSMs lock a partition after a
  few bad logins): every later call is HsmUnavailable until a restart with the right PIN.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_ec_public_key, encode_ecdsa_signature

from hsm_config import templates
from kms import metrics
from kms.backends.hsm.pkcs11_errors import (
    INTEGRITY_ERRORS,
    PIN_ERRORS,
    UNWRAP_ERRORS,
    is_transient,
)
from kms.errors import HsmUnavailable, IntegrityFailure
from kms.services.model import KekRef, WrappedKek

log = logging.getLogger("kms.hsm")
T = TypeVar("T")

# Attempts to open a session: several processes logging in to one SoftHSM token at once
# can see a half-written token file.
_CONNECT_RETRY = 5

_process_lock = threading.RLock()


def _renew_lock() -> None:
    global _process_lock
    _process_lock = threading.RLock()  # a lock held in the parent stays held in the child


os.register_at_fork(after_in_child=_renew_lock)


@dataclass(frozen=True)
class HsmConfig:
    """Which PKCS#11 module and token to use, and the labels of the objects in it. The PIN
    is left out of ``repr``."""

    module: str
    token_label: str
    pin: str = field(repr=False)
    root_label: str = "kms-root"
    audit_label: str = "kms-audit-signing"
    integrity_label: str = "kms-integrity"
    kek_cache_size: int = 1024
    softhsm2_conf: str | None = None


class _Conn:
    """Per-process connection state; replaced wholesale on reconnect."""

    def __init__(self, session: Any, root: Any, root_label: str, pid: int) -> None:
        self.session = session
        self.root = root
        self.roots = {root_label: root}
        self.pid = pid
        self.keks: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self.audit_key: Any = None
        self.integrity_key: Any = None
        self.anchors: dict[str, list[Any]] = {}  # label -> data objects last found


class Pkcs11Hsm:
    """The Hsm port over a PKCS#11 module. Safe to share between threads of one process."""

    def __init__(self, config: HsmConfig) -> None:
        self._config = config
        self._conn: _Conn | None = None
        self._pin_rejected: str | None = None
        self._kek_hits = 0
        self._kek_misses = 0
        self._lib: Any = None
        self._public_pem: bytes | None = None

    def __repr__(self) -> str:
        return f"Pkcs11Hsm(module={self._config.module!r}, token={self._config.token_label!r})"

    # -- the Hsm port ---------------------------------------------------------------------

    def new_wrapped_kek(self) -> WrappedKek:
        def op(c: _Conn) -> WrappedKek:
            kek = c.session.generate_key(
                KeyType.AES, 256, store=False, template=templates.KEK_TO_WRAP
            )
            try:
                wrapped = bytes(c.root.wrap_key(kek, mechanism=Mechanism.AES_KEY_WRAP_PAD))
            finally:
                kek.destroy()
            return WrappedKek(wrapped, self._config.root_label)

        return self._call(op)

    def encrypt(self, kek: KekRef, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        def op(c: _Conn) -> bytes:
            key = self._kek(c, kek)
            return bytes(
                key.encrypt(
                    plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad)
                )
            )

        return self._call(op)

    def decrypt(self, kek: KekRef, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        def op(c: _Conn) -> bytes:
            key = self._kek(c, kek)
            try:
                return bytes(
                    key.decrypt(
                        ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad)
                    )
                )
            except INTEGRITY_ERRORS as e:
                # Tell a bad tag from a broken HSM: if the HSM still answers, it was the data.
                self._probe(c)
                raise IntegrityFailure(type(e).__name__) from e

        return self._call(op)

    def random(self, n: int) -> bytes:
        return self._call(lambda c: bytes(c.session.generate_random(8 * n)))

    def check(self) -> None:
        self._call(self._probe)

    def audit_public_key_pem(self) -> bytes:
        if self._public_pem is None:

            def op(c: _Conn) -> bytes:
                pub = c.session.get_key(
                    object_class=ObjectClass.PUBLIC_KEY,
                    key_type=KeyType.EC,
                    label=self._config.audit_label,
                )
                der = encode_ec_public_key(pub)
                key = serialization.load_der_public_key(der)
                return key.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )

            self._public_pem = self._call(op)
        return self._public_pem

    def sign_digest(self, digest: bytes) -> bytes:
        """DER ECDSA P-256 signature of a SHA-256 digest by the audit key (SoftHSM has no
        CKM_ECDSA_SHA256, so the caller hashes and the HSM signs the digest)."""

        def op(c: _Conn) -> bytes:
            if c.audit_key is None:
                c.audit_key = c.session.get_key(
                    object_class=ObjectClass.PRIVATE_KEY,
                    key_type=KeyType.EC,
                    label=self._config.audit_label,
                )
            raw = bytes(c.audit_key.sign(digest, mechanism=Mechanism.ECDSA))
            return bytes(encode_ecdsa_signature(raw))

        return self._call(op)

    def mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` with the integrity key, computed inside the HSM."""

        def op(c: _Conn) -> bytes:
            if c.integrity_key is None:
                c.integrity_key = c.session.get_key(
                    object_class=ObjectClass.SECRET_KEY, label=self._config.integrity_label
                )
            return bytes(c.integrity_key.sign(data, mechanism=Mechanism.SHA256_HMAC))

        return self._call(op)

    def anchor_values(self, label: str, cached: bool = False) -> list[bytes]:
        """The values of the token's data objects labelled ``label`` (the audit and state
        anchors, kms/services/audit_anchor.py, state_index.py), searched for in the token
        so that another process's update is seen. With ``cached``, the objects the last
        search found are read again instead (about 40 us where a search costs a
        millisecond): objects created since are not seen, but an object destroyed since
        is, and triggers a search."""

        def op(c: _Conn) -> list[bytes]:
            objects = c.anchors.get(label) if cached else None
            if objects:
                try:
                    return [bytes(o[Attribute.VALUE]) for o in objects]
                except (p11e.ObjectHandleInvalid, p11e.NoSuchKey, KeyError):
                    pass  # destroyed by another process since: search again
            objects = list(
                c.session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label})
            )
            c.anchors[label] = objects
            return [bytes(o[Attribute.VALUE]) for o in objects]

        return self._call(op)

    def anchor_labels(self, prefix: str) -> list[str]:
        """Labels of the token's data objects whose label starts with ``prefix``."""

        def op(c: _Conn) -> list[str]:
            found = c.session.get_objects({Attribute.CLASS: ObjectClass.DATA})
            labels = (str(o[Attribute.LABEL]) for o in found)
            return sorted(label for label in labels if label.startswith(prefix))

        return self._call(op)

    def add_anchor(self, label: str, value: bytes) -> None:
        """Store a new private token data object ``label`` holding ``value``. Objects of the
        same label are left alone (remove them with drop_anchor once this one exists)."""

        def op(c: _Conn) -> None:
            c.session.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.LABEL: label,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.MODIFIABLE: False,
                    Attribute.VALUE: value,
                }
            )

        self._call(op)

    def drop_anchor(self, label: str, value: bytes) -> None:
        """Destroy the data objects ``label`` holding exactly ``value``; none is fine
        (another process got there first)."""

        def op(c: _Conn) -> None:
            found = c.session.get_objects(
                {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label}
            )
            for o in found:
                if bytes(o[Attribute.VALUE]) == value:
                    with contextlib.suppress(p11e.ObjectHandleInvalid):
                        o.destroy()

        self._call(op)

    def forget(self, key_id: str) -> None:
        """Destroy and drop this process's unwrapped session objects of every version of
        ``key_id`` (the KEK cache). Afterwards no cached object of that key is left in this
        process; a later use unwraps the wrapped material it is given again. Other worker
        processes keep theirs until they forget or evict them. Never raises: an object that
        cannot be destroyed belongs to a dead session and is gone with it."""
        with _process_lock:
            conn = self._conn
            if conn is None or conn.pid != os.getpid():
                return  # nothing cached in this process
            for ident in [i for i in conn.keks if i[0] == key_id]:
                key = conn.keks.pop(ident)
                with contextlib.suppress(p11e.PKCS11Error):
                    key.destroy()

    def cache_stats(self) -> dict[str, int]:
        """Unwrapped-KEK cache hits and misses in this process."""
        return {"kek_cache_hits": self._kek_hits, "kek_cache_misses": self._kek_misses}

    def close(self) -> None:
        """Drop this process's session (and with it the login and session objects)."""
        with _process_lock:
            conn, self._conn = self._conn, None
            if conn is not None and conn.pid == os.getpid():
                with contextlib.suppress(p11e.PKCS11Error):
                    conn.session.close()

    # -- internals ------------------------------------------------------------------------

    def _call(self, op: Callable[[_Conn], T]) -> T:
        with _process_lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    return op(conn)
                except IntegrityFailure:
                    raise
                except p11e.PKCS11Error as e:
                    metrics.hsm_error(type(e).__name__)
                    log.warning(
                        "hsm call failed",
                        extra={"error": type(e).__name__, "attempt": attempt},
                    )
                    if not is_transient(e) or attempt == 2:
                        if is_transient(e):
                            self._conn = None  # reconnect on the next call
                        raise HsmUnavailable(detail=type(e).__name__) from e
                    self._conn = None  # reconnect, then retry once
            raise AssertionError("unreachable")

    def _connection(self) -> _Conn:
        conn = self._conn
        if conn is not None and conn.pid == os.getpid():
            return conn
        self._conn = self._connect(reset=conn is not None or self._lib is not None)
        return self._conn

    def _connect(self, reset: bool) -> _Conn:
        """Initialise the module in this process and log in, retrying with a reset."""
        if self._pin_rejected:
            metrics.hsm_error("pin_rejected")
            raise HsmUnavailable(detail=f"PIN rejected earlier ({self._pin_rejected})")
        if self._config.softhsm2_conf:
            os.environ["SOFTHSM2_CONF"] = self._config.softhsm2_conf
        last: Exception | None = None
        for attempt in range(_CONNECT_RETRY):
            try:
                if self._lib is None:
                    self._lib = pkcs11.lib(self._config.module)
                if reset or attempt > 0:
                    _reset(self._lib)
                token = self._lib.get_token(token_label=self._config.token_label)
                session = _login(token, self._config.pin)
                root = session.get_key(
                    object_class=ObjectClass.SECRET_KEY, label=self._config.root_label
                )
                log.info("hsm session opened", extra={"attempt": attempt + 1})
                return _Conn(session, root, self._config.root_label, os.getpid())
            except PIN_ERRORS as e:
                self._pin_rejected = type(e).__name__
                metrics.hsm_error("pin_rejected")
                log.error(
                    "hsm rejected the PIN; not trying again", extra={"error": type(e).__name__}
                )
                raise HsmUnavailable(detail=f"PIN rejected ({type(e).__name__})") from e
            except (p11e.PKCS11Error, RuntimeError) as e:
                last = e
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # noqa: S311 (jitter)
        metrics.hsm_error("connect")
        raise HsmUnavailable(detail=f"connect failed: {type(last).__name__}") from last

    def _kek(self, c: _Conn, kek: KekRef) -> Any:
        """The unwrapped session object for a KEK version, from the bounded LRU."""
        ident = (kek.key_id, kek.version)
        key = c.keks.get(ident)
        if key is not None:
            c.keks.move_to_end(ident)
            self._kek_hits += 1
            return key
        self._kek_misses += 1
        try:
            key = self._root(c, kek.root_label).unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                kek.wrapped,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                store=False,
                template=templates.KEK_IN_USE,
            )
        except UNWRAP_ERRORS as e:
            self._probe(c)  # a broken HSM is HsmUnavailable, not bad key material
            raise IntegrityFailure(f"KEK unwrap failed: {type(e).__name__}") from e
        c.keks[ident] = key
        while len(c.keks) > self._config.kek_cache_size:
            _, old = c.keks.popitem(last=False)
            old.destroy()
        return key

    def _root(self, c: _Conn, label: str) -> Any:
        """The root key that wrapped a KEK version (the current one, or an older root
        kept in the token after a root rotation)."""
        if label not in c.roots:
            try:
                c.roots[label] = c.session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
            except p11e.NoSuchKey as e:
                raise IntegrityFailure(f"no root key {label!r} in this HSM") from e
        return c.roots[label]

    def _probe(self, c: _Conn) -> None:
        # Reading an attribute of the root key touches the token: it fails if the token is
        # gone, unlike operations on session objects held in memory.
        _ = c.root[Attribute.LABEL]


def _reset(lib: Any) -> None:
    """finalize (ignoring 'not initialised') then initialize: the only reset that works
    after a fork with reset_on_fork, unlike lib.reinitialize()."""
    with contextlib.suppress(p11e.PKCS11Error):
        lib.finalize()
    lib.initialize()


def _login(token: Any, pin: str) -> Any:
    """A read-write session (the audit anchor is a token object the server updates)."""
    try:
        return token.open(rw=True, user_pin=pin)
    except p11e.UserAlreadyLoggedIn:
        # Another session of this process is logged in; login state is per process.
        return token.open(rw=True)
