"""The Hsm port over PKCS#11: every call a server makes into the HSM goes through
``Pkcs11Hsm._call``.

Process and thread rules:
- The module is initialised lazily in the process that uses it (the pid is checked on
  every call), never in the gunicorn master; state inherited through fork() is dropped.
- python-pkcs11 initialises modules without OS locking and releases the GIL inside calls,
  so one process-wide lock (shared by every instance; renewed in a forked child)
  serialises every PKCS#11 call.
- One logged-in read-write session per process lives as long as the process; the root key
  handle and unwrapped KEK handles (bounded LRU, destroyed on eviction) are cached on it.
- Cached objects are used only while the token is known to be there: a call made more than
  ``liveness_seconds`` after the last one that touched the token first reads an attribute of
  the root key (a token object). If the token is gone, the session and every cached KEK of
  this process are dropped, so each worker stops serving within that time of the token's
  loss, not only the one a readiness probe reached (SECURITY.md, failure model).
- GCM, key wrap and unwrap go through pkcs11_calls.py (ctypes) for length handling, IVs
  the module generates, and any wrap mechanism; the rest through python-pkcs11.
- A call failing with a session, token or device error is retried once after a reconnect
  (finalize, initialize, log in again); if that fails too the caller gets HsmUnavailable
  and the next call reconnects, so the service recovers by itself when the HSM comes back.
  Other PKCS#11 errors, among them every configuration error (a missing mechanism, a
  buffer too small, a bad template), are HsmUnavailable at once, without reconnecting
  (pkcs11_errors.py says which errors are which). After a failed connect, calls fail at
  once for a second instead of connecting again (no reconnect storm while the HSM is
  down). Each failed attempt and each failed connect is counted in
  ``kms_hsm_errors_total`` (kms/metrics.py).
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
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_ec_public_key, encode_ecdsa_signature

from hsm_config import templates
from hsm_config.profiles import mechanism_name, mechanism_number
from kms import metrics
from kms.backends.hsm import pkcs11_calls as raw
from kms.backends.hsm import pkcs11_session
from kms.backends.hsm.hsm_settings import HsmConfig
from kms.backends.hsm.pkcs11_anchors import AnchorObjects
from kms.backends.hsm.pkcs11_errors import (
    INTEGRITY_ERRORS,
    PIN_ERRORS,
    UNWRAP_ERRORS,
    describe,
    is_connect_race,
    is_transient,
)
from kms.errors import HsmUnavailable, IntegrityFailure
from kms.services.model import KekRef, WrappedKek

log = logging.getLogger("kms.hsm")
T = TypeVar("T")

# Attempts to open a session: several processes logging in to one SoftHSM token at once
# can see a half-written token file (CONNECT_RACE_ERRORS; nothing else is retried).
_CONNECT_RETRY = 5
# After a failed connect, calls fail at once for this long instead of connecting again.
_CONNECT_BACKOFF = 1.0
# How long a readiness answer (a GCM round trip on the probe key) is reused.
_READY_SECONDS = 3.0
_PROBE_IV = bytes(12)
_PROBE_AAD = b"kms readiness probe"

_process_lock = threading.RLock()


def _renew_lock() -> None:
    global _process_lock
    _process_lock = threading.RLock()  # a lock held in the parent stays held in the child


os.register_at_fork(after_in_child=_renew_lock)


# Errors after which the module may hold an operation active in the session: dropped.
_LEAVES_OPERATION = (raw.BufferTooSmall, raw.ModuleMisbehaved)


class _Conn:
    """Per-process connection state; replaced wholesale on reconnect."""

    def __init__(self, session: Any, calls: raw.Calls, root: Any, root_label: str) -> None:
        self.session = session
        self.handle: int = session.handle
        self.calls = calls
        self.root = root
        self.roots = {root_label: root}
        self.pid = os.getpid()
        self.touched = time.monotonic()  # when a call last read a token object
        self.keks: OrderedDict[tuple[str, int], int] = OrderedDict()  # unwrapped handles
        self.probe_key: int | None = None
        self.audit_key: Any = None
        self.integrity_key: Any = None
        self.anchors: dict[str, list[Any]] = {}  # label -> data objects last found


class Pkcs11Hsm(AnchorObjects):
    """The Hsm port over a PKCS#11 module. Safe to share between threads of one process."""

    def __init__(self, config: HsmConfig) -> None:
        self._config = config
        self._conn: _Conn | None = None
        self._pin_rejected: str | None = None
        self._kek_hits = 0
        self._kek_misses = 0
        self._lib: Any = None
        self._calls: raw.Calls | None = None
        self._public_pem: bytes | None = None
        self._ready_at = float("-inf")
        self._retry_after = 0.0  # no connect before this (monotonic): after a failed one
        self._recent_order: deque[bytes] = deque(maxlen=4096)  # HSM-generated GCM IVs
        self._recent_ivs: set[bytes] = set()
        self._wrap = mechanism_number(config.wrap_mechanism)
        self._anchor_form = templates.ANCHOR_FORMS[config.anchor_object]

    def __repr__(self) -> str:
        return f"Pkcs11Hsm(module={self._config.module!r}, token={self._config.token_label!r})"

    # -- the Hsm port ---------------------------------------------------------------------

    def new_wrapped_kek(self) -> WrappedKek:
        def op(c: _Conn) -> WrappedKek:
            kek = c.session.generate_key(
                KeyType.AES, 256, store=False, template=templates.KEK_TO_WRAP
            )
            try:
                wrapped = raw.wrap_key(c.calls, c.handle, self._wrap, c.root.handle, kek.handle)
            finally:
                kek.destroy()
            return WrappedKek(wrapped, self._config.root_label, mechanism_name(self._wrap))

        return self._call(op)

    def encrypt(self, kek: KekRef, iv: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-256-GCM inside the HSM: (the IV used, ciphertext || tag). ``iv`` is offered;
        a module that generates its IV (profile ``gcm_iv = hsm``) replaces it, and the IV it
        wrote is returned, so the blob stores the IV the data was sealed with."""

        def op(c: _Conn) -> tuple[bytes, bytes]:
            used, sealed = raw.gcm_encrypt(c.calls, c.handle, self._kek(c, kek), iv, plaintext, aad)
            self._check_iv(iv, used)
            return used, sealed

        return self._call(op)

    def decrypt(self, kek: KekRef, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        def op(c: _Conn) -> bytes:
            key = self._kek(c, kek)
            try:
                return raw.gcm_decrypt(c.calls, c.handle, key, iv, ciphertext, aad)
            except INTEGRITY_ERRORS as e:
                # Tell a bad tag from a broken HSM: if the HSM still answers, it was the data.
                self._probe(c)
                raise IntegrityFailure(type(e).__name__) from e

        return self._call(op)

    def random(self, n: int) -> bytes:
        return self._call(lambda c: bytes(c.session.generate_random(8 * n)))

    def check(self) -> None:
        """Return only if this session reads the token and runs an AES-GCM round trip on
        its probe key (a session object); a success is reused for a few seconds."""
        if time.monotonic() - self._ready_at < _READY_SECONDS:
            return

        def op(c: _Conn) -> None:
            self._probe(c)
            if c.probe_key is None:
                c.probe_key = raw.generate_key(
                    c.calls, c.handle, Mechanism.AES_KEY_GEN, templates.PROBE_KEY
                )
            iv, sealed = raw.gcm_encrypt(c.calls, c.handle, c.probe_key, _PROBE_IV, b"", _PROBE_AAD)
            raw.gcm_decrypt(c.calls, c.handle, c.probe_key, iv, sealed, _PROBE_AAD)

        self._call(op)
        self._ready_at = time.monotonic()

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
                handle = conn.keks.pop(ident)
                with contextlib.suppress(p11e.PKCS11Error):
                    raw.destroy(conn.calls, conn.handle, handle)

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
                    if time.monotonic() - conn.touched > self._config.liveness_seconds:
                        self._probe(conn)  # cached objects only while the token is there
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
                        if is_transient(e) or isinstance(e, _LEAVES_OPERATION):
                            self._drop()  # reconnect on the next call (an operation the
                            # module left active dies with the session)
                        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                        raise HsmUnavailable(detail=reason) from e
                    self._drop()  # reconnect, then retry once
            raise AssertionError("unreachable")

    def _check_iv(self, offered: bytes, used: bytes) -> None:
        """The IV a module used must match the configured source: ours, unchanged
        (``caller``), or its own (``hsm``): written back, not zero, and not one this
        process saw lately. Otherwise ModuleMisbehaved: GCM must never reuse an IV."""
        if self._config.gcm_iv == "caller":
            if used != offered:
                raise raw.ModuleMisbehaved("the module replaced the GCM IV (KMS_HSM_GCM_IV)")
            return
        if used == offered or not any(used) or used in self._recent_ivs:
            raise raw.ModuleMisbehaved("the module's GCM IV is missing, zero or repeated")
        if len(self._recent_order) == self._recent_order.maxlen:
            self._recent_ivs.discard(self._recent_order[0])
        self._recent_order.append(used)
        self._recent_ivs.add(used)

    def _drop(self) -> None:
        """Forget this session, its cached KEKs and probe key (the next connect's reset
        finalizes the module, which destroys them)."""
        self._conn = None
        self._ready_at = float("-inf")

    def _connection(self) -> _Conn:
        conn = self._conn
        if conn is not None and conn.pid == os.getpid():
            return conn
        if not self._pin_rejected and time.monotonic() < self._retry_after:  # no storm
            raise HsmUnavailable(detail="the last connect failed moments ago")
        try:
            self._conn = self._connect(reset=conn is not None or self._lib is not None)
        except HsmUnavailable:
            self._retry_after = time.monotonic() + _CONNECT_BACKOFF
            raise
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
                    pkcs11_session.reset(self._lib)
                if self._calls is None:  # read once the module is initialised here
                    self._calls = raw.Calls(self._lib)
                token = self._lib.get_token(token_label=self._config.token_label)
                session = pkcs11_session.login(token, self._config.pin)
                root = session.get_key(
                    object_class=ObjectClass.SECRET_KEY, label=self._config.root_label
                )
                log.info("hsm session opened", extra={"attempt": attempt + 1})
                assert self._calls is not None  # set with self._lib
                return _Conn(session, self._calls, root, self._config.root_label)
            except PIN_ERRORS as e:
                self._pin_rejected = type(e).__name__
                metrics.hsm_error("pin_rejected")
                log.error(
                    "hsm rejected the PIN; not trying again", extra={"error": type(e).__name__}
                )
                raise HsmUnavailable(detail=f"PIN rejected ({type(e).__name__})") from e
            except p11e.PKCS11Error as e:
                if not is_connect_race(e):
                    metrics.hsm_error("connect")
                    log.error("hsm connect failed", extra={"error": type(e).__name__})
                    raise HsmUnavailable(detail=f"connect failed: {describe(e)}") from e
                last = e
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # noqa: S311 (jitter)
            except (RuntimeError, OSError) as e:  # the module does not load
                metrics.hsm_error("connect")
                log.error("hsm connect failed", extra={"error": type(e).__name__})
                raise HsmUnavailable(detail=f"connect failed: {describe(e)}") from e
        metrics.hsm_error("connect")
        raise HsmUnavailable(detail=f"connect failed: {type(last).__name__}") from last

    def _kek(self, c: _Conn, kek: KekRef) -> int:
        """The handle of the unwrapped session object for a KEK version, from the bounded
        LRU. It is unwrapped with the mechanism recorded beside it, whatever the profile
        wraps new KEKs with now."""
        ident = (kek.key_id, kek.version)
        key = c.keks.get(ident)
        if key is not None:
            c.keks.move_to_end(ident)
            self._kek_hits += 1
            return key
        self._kek_misses += 1
        try:
            mechanism = mechanism_number(kek.wrap_mechanism)
        except ValueError as e:
            raise IntegrityFailure(f"unknown wrap mechanism {kek.wrap_mechanism!r}") from e
        try:
            key = raw.unwrap_key(
                c.calls,
                c.handle,
                mechanism,
                self._root(c, kek.root_label).handle,
                kek.wrapped,
                templates.KEK_UNWRAPPED,
            )
        except UNWRAP_ERRORS as e:
            self._probe(c)  # a broken HSM is HsmUnavailable, not bad key material
            raise IntegrityFailure(f"KEK unwrap failed: {type(e).__name__}") from e
        c.keks[ident] = key
        while len(c.keks) > self._config.kek_cache_size:
            _, old = c.keks.popitem(last=False)
            raw.destroy(c.calls, c.handle, old)
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
        c.touched = time.monotonic()
