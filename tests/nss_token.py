"""A second real PKCS#11 token for tests: NSS softokn behind p11-kit's proxy module.

``libsoftokn3.so`` refuses ``C_Initialize(NULL)`` (python-pkcs11's call): it needs its database
directory in the init arguments. p11-kit's proxy (``p11-kit-proxy.so``) passes them from a
module file's ``x-init-reserved``, so tests load the proxy and p11-kit loads softokn.
``make_nss_token(root)`` builds everything under ``root``: an NSS database with a random PIN
and a p11-kit configuration that only processes pointed at it see.

How p11-kit is pointed at that configuration (p11-kit 0.24, Debian 12):

- p11-kit has no environment variable naming its config. Its *user* config is
  ``~/.config/pkcs11/{pkcs11.conf,modules/}``, and ``~/.config`` is ``$XDG_CONFIG_HOME`` when
  that is set, so ``env`` sets XDG_CONFIG_HOME (not HOME: nothing else moves). Our
  ``pkcs11.conf`` says ``user-config: only``, so the system and package module directories
  are not read; same-named files with ``disable-in: p11-kit-proxy`` hide those modules as
  well, should a system ``pkcs11.conf`` keep its modules merged.
- But p11-kit ignores user config when ``getuid() == 0``, and this machine and CI run as
  root. So ``command()`` runs a subprocess in a user namespace as an unprivileged uid
  (``unshare --user --map-user=65534``; the caller's files still belong to it there), and
  ``activate()`` points the current process's p11-kit at the config with
  ``p11_kit_override_system_files()`` (exported by libp11-kit, declared in p11-kit.h as
  unstable API; p11-kit's and GnuTLS's test suites use it). It must run before the proxy is
  first initialized in the process; p11-kit reads its config when the proxy is loaded.

The proxy shows two NSS slots: "NSS Generic Crypto Services" (no login, session objects
only) and ``token_label`` ("NSS Certificate DB", the one with the PIN and token objects).
Missing Debian packages raise ``NssTokenUnavailable`` naming the package: tests fail, never
skip.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_LIBDIR = Path("/usr/lib") / (sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu")
SOFTOKN = _LIBDIR / "libsoftokn3.so"  # Debian package libnss3
PROXY = _LIBDIR / "p11-kit-proxy.so"  # Debian package p11-kit-modules
TOKEN_LABEL = "NSS Certificate DB"
# Where p11-kit 0.24 finds the modules it would otherwise load through the proxy.
SYSTEM_MODULE_DIRS = (Path("/usr/share/p11-kit/modules"), Path("/etc/pkcs11/modules"))
_UNPRIVILEGED = ("unshare", "--user", "--map-user=65534", "--map-group=65534")

# p11_kit_override_system_files() keeps the pointers it is given: keep the strings alive.
_overrides: list[bytes] = []


class NssTokenUnavailable(RuntimeError):
    """A Debian package the NSS token needs is not installed (the message names it)."""


@dataclass(frozen=True)
class NssToken:
    """An initialized NSS softokn database reachable through ``module_path``."""

    module_path: str  # p11-kit-proxy.so: what pkcs11.lib() loads
    token_label: str  # "NSS Certificate DB"
    pin: str  # user PIN (random)
    pin_file: Path  # mode 0600, its content is the PIN (certutil -f)
    db_dir: Path  # the NSS database: sql:<db_dir>
    config_dir: Path  # p11-kit config: pkcs11.conf and modules/
    env: Mapping[str, str]  # what a non-root subprocess needs on top of os.environ

    def activate(self) -> None:
        """Make this process's p11-kit load this token's config (root or not).

        Call before the proxy is first loaded here (``pkcs11.lib(module_path)``); one token
        per process. Leaves ``os.environ`` alone: as root the environment cannot do it.
        """
        paths = [
            str(self.config_dir / "pkcs11.conf"),  # system config
            str(self.config_dir / "pkcs11.conf"),  # user config
            str(self.config_dir / "modules"),  # package modules
            str(self.config_dir / "modules"),  # system modules
            str(self.config_dir / "modules"),  # user modules
        ]
        encoded = [p.encode() for p in paths]
        _overrides.extend(encoded)
        override = ctypes.CDLL(self.module_path).p11_kit_override_system_files
        override.argtypes = [ctypes.c_char_p] * 5
        override.restype = None
        override(*encoded)

    def command(self, *argv: str) -> list[str]:
        """``argv`` wrapped so that p11-kit in it reads this config (run it with ``run_env()``).

        As root the command runs as uid 65534 in a new user namespace, where p11-kit reads
        user config; the caller's files stay its own there.
        """
        prefix = _UNPRIVILEGED if os.getuid() == 0 else ()
        return [*prefix, *argv]

    def run_env(self) -> dict[str, str]:
        """``os.environ`` plus ``env``: the environment for a ``command()``."""
        return {**os.environ, **self.env}


def _require(path: Path | None, what: str, package: str) -> Path:
    if path is None or not path.exists():
        raise NssTokenUnavailable(
            f"{what} not found ({path or 'not on PATH'}): install the Debian package "
            f"{package} (`make system-deps` does)"
        )
    return path


def _which(name: str) -> Path | None:
    found = shutil.which(name)
    return Path(found) if found else None


def make_nss_token(root: Path) -> NssToken:
    """Create an NSS database and a p11-kit config for it under ``root`` (an empty directory).

    Raises ``NssTokenUnavailable`` when a needed Debian package is missing.
    """
    certutil = _require(_which("certutil"), "certutil", "libnss3-tools")
    _require(SOFTOKN, "NSS softokn", "libnss3")
    _require(PROXY, "the p11-kit proxy module", "p11-kit-modules")
    if os.getuid() == 0:
        _require(_which("unshare"), "unshare", "util-linux")

    pin = secrets.token_urlsafe(18)
    pin_file = root / "pin"
    pin_file.touch(mode=0o600)
    pin_file.write_text(pin)
    db_dir = root / "nssdb"
    db_dir.mkdir(mode=0o700)
    subprocess.run(
        [str(certutil), "-N", "-d", f"sql:{db_dir}", "-f", str(pin_file)],
        check=True,
        capture_output=True,
    )

    xdg = root / "xdg"
    config_dir = xdg / "pkcs11"
    modules = config_dir / "modules"
    modules.mkdir(parents=True)
    (config_dir / "pkcs11.conf").write_text("user-config: only\n")
    for directory in SYSTEM_MODULE_DIRS:
        for other in directory.glob("*.module"):
            (modules / other.name).write_text("disable-in: p11-kit-proxy\n")
    (modules / "kms-test-nss-softokn.module").write_text(
        f"module: {SOFTOKN}\n"
        f"x-init-reserved: configdir='sql:{db_dir}' certPrefix='' keyPrefix='' secmod='' flags=\n"
        "critical: yes\n"
    )
    return NssToken(
        module_path=str(PROXY),
        token_label=TOKEN_LABEL,
        pin=pin,
        pin_file=pin_file,
        db_dir=db_dir,
        config_dir=config_dir,
        env={"XDG_CONFIG_HOME": str(xdg)},
    )
