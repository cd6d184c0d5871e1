"""Preflight: before ``kms init`` creates anything and before ``kms serve`` starts
gunicorn, prove the configured module can do everything the KMS will ask of it.

In order, each a named step: load the module, find the token, log in, read the mechanism
list (every mechanism the KMS needs must be there, the missing ones named), then a round
trip of every operation on session objects that vanish with the session: AES key
generation, wrap and unwrap of a KEK with the profile's wrap mechanism, AES-GCM with the
profile's IV source, ECDSA P-256, HMAC-SHA256, random bytes, and, if the profile says
the module honours it, a check that the unwrap template refuses an extractable unwrap.
The one token object the server writes (an anchor, in the profile's form) is created,
read back and destroyed at once; nothing else touches the token, so a failure leaves no
half-provisioned token behind.

``run_preflight`` runs the steps in a child process (``python -m
kms.backends.hsm.preflight``, the configuration on stdin): a module that crashes or hangs
takes the child down, not the CLI, and the parent names the step it died in. The parent
never loads the module, so ``kms serve`` still initialises PKCS#11 only after fork.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from hsm_config import templates
from hsm_config.profiles import mechanism_number
from kms.backends.hsm import pkcs11_calls as raw
from kms.backends.hsm.hsm_settings import HsmConfig
from kms.backends.hsm.pkcs11_errors import describe
from kms.errors import PreflightFailed

TIMEOUT_SECONDS = 60
_NEEDED = {
    Mechanism.AES_KEY_GEN: "CKM_AES_KEY_GEN",
    Mechanism.AES_GCM: "CKM_AES_GCM",
    Mechanism.EC_KEY_PAIR_GEN: "CKM_EC_KEY_PAIR_GEN",
    Mechanism.ECDSA: "CKM_ECDSA",
    Mechanism.GENERIC_SECRET_KEY_GEN: "CKM_GENERIC_SECRET_KEY_GEN",
    Mechanism.SHA256_HMAC: "CKM_SHA256_HMAC",
}


# Errors of an HSM that may come back (a device or token not reachable right now): worth
# a restart. A token label no slot has is a configuration error, not one of these.
_PASSING = (
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.DeviceError,
    p11e.DeviceRemoved,
    p11e.DeviceMemory,
    p11e.SessionCount,
)


def run_preflight(config: HsmConfig) -> list[str]:
    """Run every step in a child process; return the steps passed, or raise
    PreflightFailed naming the failed step (or the one the module crashed or hung in)."""
    payload = json.dumps(asdict(config))
    try:
        done = subprocess.run(
            [sys.executable, "-P", "-m", "kms.backends.hsm.preflight"],  # -P: no cwd on path
            input=payload,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        steps = _steps(e.stdout if isinstance(e.stdout, str) else "")
        raise PreflightFailed(
            detail=f"the PKCS#11 module did not answer within {TIMEOUT_SECONDS} s "
            f"(step: {steps[-1] if steps else 'load'})",
            permanent=False,
        ) from None
    lines = done.stdout.splitlines()
    steps = _steps(done.stdout)
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise PreflightFailed(
            detail=f"the PKCS#11 module crashed ({name}) in step {steps[-1] if steps else 'load'}"
        )
    failure = next((line.split(" ", 2) for line in lines if line.startswith("fail ")), None)
    if failure is not None and len(failure) == 3:
        raise PreflightFailed(detail=failure[2], permanent=failure[1] == "permanent")
    if done.returncode != 0 or "ok" not in lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise PreflightFailed(detail=f"preflight exited with {done.returncode}: {last}")
    return steps


def _steps(stdout: str) -> list[str]:
    return [line[len("step ") :] for line in stdout.splitlines() if line.startswith("step ")]


def check(config: HsmConfig, report: Callable[[str], None]) -> None:
    """Every step, in this process; ``report`` is told each step's name as it starts.
    Raises PreflightFailed with the step and the reason."""
    if config.softhsm2_conf:
        os.environ["SOFTHSM2_CONF"] = config.softhsm2_conf
    step = "load"
    try:
        report(step)
        lib = pkcs11.lib(config.module)
        calls = raw.Calls(lib)
        step = "token"
        report(step)
        token = lib.get_token(token_label=config.token_label)
        step = "login"
        report(step)
        with token.open(rw=True, user_pin=config.pin) as session:
            step = "mechanisms"
            report(step)
            _mechanisms(token.slot, mechanism_number(config.wrap_mechanism), config)
            for name, test in _ROUND_TRIPS:
                step = name
                report(step)
                test(session, calls, config)
    except PreflightFailed as e:
        raise PreflightFailed(detail=f"{step}: {e.detail}") from e
    except (p11e.PKCS11Error, RuntimeError, OSError, ValueError) as e:
        if step == "load":
            raise PreflightFailed(
                detail=f"load: {config.module} is not a PKCS#11 module that loads here "
                f"({type(e).__name__}: {e})"
            ) from e
        raise PreflightFailed(
            detail=f"{step}: {describe(e)}", permanent=not isinstance(e, _PASSING)
        ) from e


def _mechanisms(slot: Any, wrap: int, config: HsmConfig) -> None:
    offered = {int(m) for m in slot.get_mechanisms()}
    needed = {int(m): name for m, name in _NEEDED.items()}
    needed[wrap] = config.wrap_mechanism
    missing = sorted(name for number, name in needed.items() if number not in offered)
    if missing:
        raise PreflightFailed(
            detail=f"the token lacks {', '.join(missing)}"
            + (
                " (the wrap mechanism is KMS_HSM_WRAP_MECHANISM or the profile's)"
                if config.wrap_mechanism in missing
                else ""
            )
        )


def _session_aes(calls: raw.Calls, session: Any, template: dict[Any, Any]) -> int:
    return raw.generate_key(
        calls, session.handle, Mechanism.AES_KEY_GEN, {**template, Attribute.VALUE_LEN: 32}
    )


def _wrap_round_trip(session: Any, calls: raw.Calls, config: HsmConfig) -> None:
    wrapping: dict[Any, Any] = {**templates.ROOT_KEY, Attribute.TOKEN: False}
    if config.unwrap_template:
        wrapping[raw.CKA_UNWRAP_TEMPLATE] = templates.ROOT_UNWRAP_TEMPLATE
    root = _session_aes(calls, session, {**_CLASS, **wrapping})
    kek = _session_aes(calls, session, {**_CLASS, **templates.KEK_TO_WRAP})
    mech = mechanism_number(config.wrap_mechanism)
    wrapped = raw.wrap_key(calls, session.handle, mech, root, kek)
    key = raw.unwrap_key(calls, session.handle, mech, root, wrapped, templates.KEK_UNWRAPPED)
    iv, sealed = raw.gcm_encrypt(calls, session.handle, key, os.urandom(12), b"kek", b"")
    if raw.gcm_decrypt(calls, session.handle, key, iv, sealed, b"") != b"kek":
        raise PreflightFailed(detail="an unwrapped KEK does not decrypt what it encrypted")
    if config.unwrap_template:
        extractable = {**templates.KEK_UNWRAPPED, Attribute.EXTRACTABLE: True}
        try:
            raw.unwrap_key(calls, session.handle, mech, root, wrapped, extractable)
        except p11e.PKCS11Error:
            return  # refused, as the unwrap template says
        raise PreflightFailed(
            detail="the module ignores CKA_UNWRAP_TEMPLATE: use a profile whose "
            "unwrap_template is false and the vendor's ceremony (hsm_config/README.md)"
        )


def _gcm_round_trip(session: Any, calls: raw.Calls, config: HsmConfig) -> None:
    key = _session_aes(calls, session, {**_CLASS, **templates.KEK_IN_USE})
    offered = os.urandom(12)
    iv, sealed = raw.gcm_encrypt(calls, session.handle, key, offered, b"probe", b"aad")
    if raw.gcm_decrypt(calls, session.handle, key, iv, sealed, b"aad") != b"probe":
        raise PreflightFailed(detail="AES-GCM does not decrypt what it encrypted")
    generated = iv != offered
    if generated:  # a second IV of the module's own must differ, and neither be zero
        iv2, _ = raw.gcm_encrypt(calls, session.handle, key, offered, b"probe", b"aad")
        if iv2 == iv or not any(iv) or not any(iv2):
            raise PreflightFailed(detail="the module's GCM IVs are zero or repeat")
    if generated != (config.gcm_iv == "hsm"):
        said = "generates its own" if generated else "uses the caller's"
        raise PreflightFailed(
            detail=f"the module {said} GCM IV but KMS_HSM_GCM_IV is {config.gcm_iv!r}"
        )


def _ecdsa_round_trip(session: Any, calls: raw.Calls, config: HsmConfig) -> None:
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
    )
    public, private = params.generate_keypair(store=False)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"preflight")
    raw_sig = bytes(private.sign(digest.finalize(), mechanism=Mechanism.ECDSA))
    point = bytes(public[Attribute.EC_POINT])
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])  # DER OCTET
    half = len(raw_sig) // 2
    signature = encode_dss_signature(
        int.from_bytes(raw_sig[:half], "big"), int.from_bytes(raw_sig[half:], "big")
    )
    key.verify(signature, b"preflight", ec.ECDSA(hashes.SHA256()))


def _anchor_round_trip(session: Any, calls: raw.Calls, config: HsmConfig) -> None:
    """The one token object the server writes while it runs (the audit and state
    anchors): created in the profile's form, read back, destroyed at once."""
    cls, attribute, template = templates.ANCHOR_FORMS[config.anchor_object]
    for left in session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: "kms-preflight"}):
        left.destroy()  # from a preflight killed before it cleaned up
    value = os.urandom(48)
    obj = session.create_object(
        {**template, Attribute.CLASS: cls, Attribute.LABEL: "kms-preflight", attribute: value}
    )
    try:
        if bytes(obj[attribute]) != value:
            raise PreflightFailed(detail="a token object does not return the value stored")
    finally:
        obj.destroy()
    if len(bytes(session.generate_random(256))) != 32:
        raise PreflightFailed(detail="C_GenerateRandom returned the wrong length")


def _hmac_round_trip(session: Any, calls: raw.Calls, config: HsmConfig) -> None:
    key = session.generate_key(
        KeyType.GENERIC_SECRET, 256, store=False, template={Attribute.SIGN: True}
    )
    first = bytes(key.sign(b"preflight", mechanism=Mechanism.SHA256_HMAC))
    if len(first) != 32 or bytes(key.sign(b"preflight", mechanism=Mechanism.SHA256_HMAC)) != first:
        raise PreflightFailed(detail="HMAC-SHA256 is not deterministic 32-byte output")


_CLASS = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES}
_ROUND_TRIPS: list[tuple[str, Callable[[Any, raw.Calls, HsmConfig], None]]] = [
    ("wrap", _wrap_round_trip),
    ("gcm", _gcm_round_trip),
    ("ecdsa", _ecdsa_round_trip),
    ("hmac", _hmac_round_trip),
    ("anchor", _anchor_round_trip),
]


def _main() -> int:
    """The child: the HsmConfig as JSON on stdin; ``step NAME`` lines, then ``ok`` or
    ``fail REASON`` on stdout."""
    config = HsmConfig(**json.load(sys.stdin))

    def report(step: str) -> None:
        print(f"step {step}", flush=True)

    try:
        check(config, report)
    except PreflightFailed as e:
        kind = "permanent" if e.permanent else "passing"
        print(f"fail {kind} {e.detail}", flush=True)
        return 1
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
