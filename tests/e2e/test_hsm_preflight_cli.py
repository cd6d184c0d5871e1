"""Issue 20: the preflight of ``kms init`` and ``kms serve`` on SoftHSM and on modules that
are not PKCS#11, or that crash. Each failure is one clear line on stderr (the step and the
reason), a non-zero exit, no traceback, no retry loop, and ``kms init`` leaves no
half-provisioned token behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, init_data_dir, run_kms

pytestmark = pytest.mark.e2e

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
LIBZ = "/usr/lib/x86_64-linux-gnu/libz.so.1"  # a real ELF shared library, not PKCS#11
QUICK_SECONDS = 20.0  # a failed preflight ends well within this: no retry loop
KMS_KEYS = ("kms-root", "kms-integrity", "kms-audit-signing")

# The labels of every object on the token, as a fresh logged-in session sees them.
_TOKEN_LABELS = """
import json
import pkcs11
from pkcs11 import Attribute
lib = pkcs11.lib({module!r})
token = lib.get_token(token_label={label!r})
with token.open(user_pin={pin!r}) as session:
    print(json.dumps(sorted(str(o[Attribute.LABEL]) for o in session.get_objects())))
"""


def token_labels(data_dir: Path) -> list[str]:
    """The labels of the objects on the SoftHSM token of ``data_dir`` (from a subprocess:
    a process holds one SoftHSM configuration)."""
    code = _TOKEN_LABELS.format(
        module=SOFTHSM, label="kms", pin=(data_dir / "hsm.pin").read_text().strip()
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"SOFTHSM2_CONF": str(data_dir / "softhsm2.conf"), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


EX_CONFIG = 78  # kms serve: a preflight failure a restart cannot cure


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    """Run ``argv`` (``env`` over os.environ); exit status, stdout, stderr and seconds."""
    started = time.monotonic()
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def kms(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    return timed([sys.executable, "-m", "kms", *args], env)


def assert_one_clear_line(code: int, stderr: str, seconds: float, *wanted: str) -> str:
    """A non-zero exit with exactly one line on stderr holding every ``wanted`` string,
    no traceback, within QUICK_SECONDS; the line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0, stderr
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for text in wanted:
        assert text in lines[0], lines[0]
    assert seconds < QUICK_SECONDS, f"took {seconds:.1f} s: {lines[0]}"
    return lines[0]


def serve(data_dir: Path, env: dict[str, str]) -> tuple[int, str, str, float]:
    """``kms serve`` on ``data_dir`` with ``env``: it must end by itself (before gunicorn)."""
    code, out, err, seconds = kms(
        "serve", "--data-dir", str(data_dir), "--bind", f"127.0.0.1:{free_port()}", env=env
    )
    assert "Booting worker" not in out + err and "Listening at" not in out + err, out + err
    return code, out, err, seconds


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised SoftHSM data directory, for ``kms serve`` with a bad setting."""
    return init_data_dir(tmp_path_factory.mktemp("preflight-served"))


@pytest.fixture
def wrong_pin(tmp_path: Path) -> Path:
    path = tmp_path / "wrong.pin"
    path.touch(mode=0o600)
    path.write_text("not-the-pin-1234")
    return path


# -- a wrap mechanism the token lacks -------------------------------------------------------


def test_init_refuses_a_wrap_mechanism_softhsm_lacks_and_creates_no_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, out, err, seconds = kms(
        "init",
        "--data-dir",
        str(data),
        "--single-operator",
        env={"KMS_HSM_WRAP_MECHANISM": "CKM_AES_KEY_WRAP_KWP"},
    )
    line = assert_one_clear_line(
        code, err, seconds, "hsm_preflight_failed", "mechanisms", "CKM_AES_KEY_WRAP_KWP"
    )
    assert "KMS_HSM_WRAP_MECHANISM" in line
    assert "HSM keys created" not in out and not (data / "admin.token").exists()
    # the token was made (softhsm2-util) before the preflight; nothing is in it
    assert (data / "softhsm2.conf").exists() and (data / "hsm.pin").exists()
    labels = token_labels(data)
    assert not set(labels) & set(KMS_KEYS), labels
    assert labels == []
    # with the profile's own mechanism, the same directory is then initialised
    done = run_kms("init", "--data-dir", str(data), "--single-operator")
    assert done.returncode == 0, done.stderr
    assert set(KMS_KEYS) <= set(token_labels(data))


# -- a module that is not PKCS#11, a missing token, a wrong PIN -----------------------------


def _init_args(data: Path, module: str, label: str, pin_file: Path) -> list[str]:
    return [
        "init",
        "--data-dir",
        str(data),
        "--single-operator",
        "--pkcs11-module",
        module,
        "--token-label",
        label,
        "--pin-file",
        str(pin_file),
    ]


@pytest.mark.parametrize(
    ("module", "wanted"),
    [
        ("/etc/hostname", ("load", "/etc/hostname", "not a PKCS#11 module")),
        (LIBZ, ("load", LIBZ, "not a PKCS#11 module")),
        ("/nonexistent/libpkcs11.so", ("load", "/nonexistent/libpkcs11.so")),
    ],
    ids=["text-file", "libz", "missing-file"],
)
def test_a_module_that_is_not_pkcs11_is_one_line_from_init_and_serve(
    module: str, wanted: tuple[str, ...], served_dir: Path, tmp_path: Path, wrong_pin: Path
) -> None:
    assert Path(module).exists() or module.startswith("/nonexistent"), module
    data = tmp_path / "data"
    code, _, err, seconds = kms(*_init_args(data, module, "kms", wrong_pin))
    assert_one_clear_line(code, err, seconds, "hsm_preflight_failed", *wanted)
    assert not (data / "kms.sqlite3").exists() and not (data / "admin.token").exists()
    assert not (data / "kms.conf").exists()  # a configuration that failed is not recorded
    code, _, err, seconds = serve(served_dir, {"KMS_PKCS11_MODULE": module})
    assert_one_clear_line(code, err, seconds, "hsm_preflight_failed", *wanted)
    assert code == EX_CONFIG  # systemd does not restart it


def test_a_token_label_that_does_not_exist_is_one_line_from_init_and_serve(
    served_dir: Path, tmp_path: Path
) -> None:
    env = {"KMS_SOFTHSM2_CONF": str(served_dir / "softhsm2.conf")}
    pin = served_dir / "hsm.pin"
    data = tmp_path / "data"
    code, _, err, seconds = kms(*_init_args(data, SOFTHSM, "no-such-token", pin), env=env)
    wanted = ("hsm_preflight_failed", "token:", "no token with the configured label")
    assert_one_clear_line(code, err, seconds, *wanted)
    assert not (data / "kms.sqlite3").exists()
    code, _, err, seconds = serve(served_dir, {"KMS_HSM_TOKEN_LABEL": "no-such-token"})
    assert_one_clear_line(code, err, seconds, *wanted)
    assert code == EX_CONFIG  # a label no slot has: no restart loop either


def test_a_wrong_pin_is_one_line_from_init_and_serve(
    served_dir: Path, tmp_path: Path, wrong_pin: Path
) -> None:
    env = {"KMS_SOFTHSM2_CONF": str(served_dir / "softhsm2.conf")}
    data = tmp_path / "data"
    code, _, err, seconds = kms(*_init_args(data, SOFTHSM, "kms", wrong_pin), env=env)
    wanted = ("hsm_preflight_failed", "login:", "the HSM rejected the PIN")
    assert_one_clear_line(code, err, seconds, *wanted)
    assert not (data / "kms.sqlite3").exists()
    code, _, err, seconds = serve(served_dir, {"KMS_HSM_PIN_FILE": str(wrong_pin)})
    assert_one_clear_line(code, err, seconds, *wanted)
    assert code == EX_CONFIG  # never a restart loop of failed logins
    # the token still opens with the right PIN: nothing was locked or created
    assert set(KMS_KEYS) <= set(token_labels(served_dir))


# -- a module that crashes ------------------------------------------------------------------

# CK_FUNCTION_LIST: a CK_VERSION (2 bytes), then 68 function pointers (8-byte aligned). Every
# entry, C_Initialize first, kills the process the way a broken vendor library would.
_CRASHING_MODULE = """
#include <signal.h>
#include <stdlib.h>

typedef unsigned long (*entry)(void);
static unsigned long die(void) { %s; return 0; }
static struct { unsigned char major, minor; entry calls[68]; } functions = { 2, 40, { 0 } };

unsigned long C_GetFunctionList(void **list) {
    for (int i = 0; i < 68; i++) functions.calls[i] = die;
    *list = &functions;
    return 0;
}
"""
_HOW = {"SIGABRT": "abort()", "SIGSEGV": "raise(SIGSEGV)"}


@pytest.fixture(params=sorted(_HOW))
def crashing_module(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    """A shared library whose C_GetFunctionList works and whose C_Initialize (and every
    other call) dies of the parametrized signal; the library and the signal's name."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found: install the Debian package gcc (`make system-deps` does)")
    signame = str(request.param)
    source, library = tmp_path / "crash.c", tmp_path / "libcrash-pkcs11.so"
    source.write_text(textwrap.dedent(_CRASHING_MODULE % _HOW[signame]))
    done = subprocess.run(
        [gcc, "-shared", "-fPIC", "-o", str(library), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return library, signame


def test_a_module_that_crashes_is_named_by_init_and_serve(
    crashing_module: tuple[Path, str], served_dir: Path, tmp_path: Path, wrong_pin: Path
) -> None:
    library, signame = crashing_module
    wanted = ("hsm_preflight_failed", f"the PKCS#11 module crashed ({signame})", "in step load")
    data = tmp_path / "data"
    code, _, err, seconds = kms(*_init_args(data, str(library), "kms", wrong_pin))
    assert_one_clear_line(code, err, seconds, *wanted)
    assert not (data / "kms.sqlite3").exists()
    # serve: the module set in an existing data directory's kms.conf
    conf = served_dir / "kms.conf"
    original = conf.read_text()
    try:
        conf.write_text(original + f"KMS_PKCS11_MODULE={library}\n")
        code, _, err, seconds = serve(served_dir, {})
    finally:
        conf.write_text(original)
    assert_one_clear_line(code, err, seconds, *wanted)
    assert code == EX_CONFIG
