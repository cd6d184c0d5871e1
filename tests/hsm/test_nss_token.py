"""NSS softokn through p11-kit's proxy: the second real PKCS#11 token the suite can use.

These tests pin what tests/nss_token.py promises: one token with the NSS label and the random
PIN, the mechanisms the server needs, token objects that persist on disk and are seen from
other processes (also two at once), and a proxy that survives finalize + initialize.
(AES-GCM encryption is not exercised here: python-pkcs11 0.10.1 trusts NSS's length answer,
see shared/notes/second-pkcs11.md.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import TYPE_CHECKING

import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e

from tests.nss_token import NssToken

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib

# Run in a subprocess (argv: module, token label, key label; PIN on stdin): log in, say
# "ready", wait for "go", then draw random bytes and find the key a few times, and print
# what was found as JSON.
_WORKER = """
import json, sys
import pkcs11
from pkcs11 import Attribute, ObjectClass
module, token_label, key_label = sys.argv[1:4]
pin = sys.stdin.readline().strip()
lib = pkcs11.lib(module)
token = lib.get_token(token_label=token_label)
with token.open(user_pin=pin) as session:
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
    found = []
    for _ in range(20):
        assert len(session.generate_random(256)) == 32
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=key_label)
        found.append([key[Attribute.LABEL], key[Attribute.VALUE_LEN], key[Attribute.TOKEN]])
print(json.dumps(found[-1]), flush=True)
"""


def _worker(nss_token: NssToken, key_label: str) -> subprocess.Popen[str]:
    argv = nss_token.command(
        sys.executable, "-c", _WORKER, nss_token.module_path, nss_token.token_label, key_label
    )
    process = subprocess.Popen(
        argv,
        env=nss_token.run_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None
    process.stdin.write(nss_token.pin + "\n")
    process.stdin.flush()
    return process


def _finish(process: subprocess.Popen[str]) -> list[object]:
    out, err = process.communicate("go\n", timeout=60)
    assert process.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def _token_key(nss_lib: Pkcs11Lib, nss_token: NssToken) -> str:
    label = f"persist-{uuid.uuid4().hex}"
    token = nss_lib.get_token(token_label=nss_token.token_label)
    with token.open(rw=True, user_pin=nss_token.pin) as session:
        session.generate_key(KeyType.AES, 256, label=label, store=True)
    return label


def test_proxy_exposes_nss_only_and_one_token_with_the_label(
    nss_lib: Pkcs11Lib, nss_token: NssToken
) -> None:
    tokens = [slot.get_token() for slot in nss_lib.get_slots(token_present=True)]
    labels = [token.label for token in tokens]
    assert labels.count(nss_token.token_label) == 1
    # softokn's two slots, nothing the machine's own p11-kit config would add (SoftHSM...)
    assert sorted(labels) == ["NSS Certificate DB", "NSS Generic Crypto Services"]
    assert {token.manufacturer_id for token in tokens} == {"Mozilla Foundation"}


def test_login_with_the_pin(nss_lib: Pkcs11Lib, nss_token: NssToken) -> None:
    token = nss_lib.get_token(token_label=nss_token.token_label)
    assert nss_token.pin_file.read_text() == nss_token.pin
    assert nss_token.pin_file.stat().st_mode & 0o777 == 0o600
    with token.open(user_pin=nss_token.pin) as session:
        assert len(session.generate_random(128)) == 16


def test_wrong_pin_is_refused(nss_lib: Pkcs11Lib, nss_token: NssToken) -> None:
    token = nss_lib.get_token(token_label=nss_token.token_label)
    with pytest.raises(p11e.PinIncorrect), token.open(user_pin=nss_token.pin + "x"):
        pass


def test_mechanisms_the_server_uses(nss_lib: Pkcs11Lib, nss_token: NssToken) -> None:
    token = nss_lib.get_token(token_label=nss_token.token_label)
    mechanisms = set(token.slot.get_mechanisms())
    wanted = {
        Mechanism.AES_GCM,
        Mechanism.AES_KEY_WRAP_KWP,
        Mechanism.AES_KEY_WRAP_PAD,
        Mechanism.EC_KEY_PAIR_GEN,
        Mechanism.ECDSA,
        Mechanism.SHA256_HMAC,
    }
    assert wanted <= mechanisms


def test_token_key_persists_and_is_seen_from_another_process(
    nss_lib: Pkcs11Lib, nss_token: NssToken
) -> None:
    label = _token_key(nss_lib, nss_token)
    assert _finish(_worker(nss_token, label)) == [label, 32, True]


def test_two_processes_use_the_database_at_once(nss_lib: Pkcs11Lib, nss_token: NssToken) -> None:
    label = _token_key(nss_lib, nss_token)
    first, second = _worker(nss_token, label), _worker(nss_token, label)
    for process in (first, second):  # both logged in, sessions open, before either works
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
    assert _finish(first) == _finish(second) == [label, 32, True]


def test_finalize_and_initialize_again_finds_the_token(
    nss_lib: Pkcs11Lib, nss_token: NssToken
) -> None:
    label = _token_key(nss_lib, nss_token)
    nss_lib.finalize()
    nss_lib.initialize()
    token = nss_lib.get_token(token_label=nss_token.token_label)
    with token.open(user_pin=nss_token.pin) as session:
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
        assert key[Attribute.TOKEN] is True
