"""SoftHSM2 bootstrap for ``kms init``: a configuration file and an initialised token.

Production HSMs are initialised with their vendor's tools; see hsm_config/README.md.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

TEMPLATE = Path(__file__).with_name("softhsm2.conf.template")


class SoftHsmError(RuntimeError):
    """softhsm2-util is missing or failed; the message says what to do."""


def write_config(data_dir: Path) -> Path:
    """Write DATA_DIR/softhsm2.conf pointing at DATA_DIR/tokens (kept if it exists)."""
    conf = data_dir / "softhsm2.conf"
    tokendir = data_dir / "tokens"
    tokendir.mkdir(mode=0o700, exist_ok=True)
    if not conf.exists():
        conf.write_text(TEMPLATE.read_text().format(tokendir=tokendir))
        conf.chmod(0o600)
    return conf


def write_secret(path: Path, value: str) -> None:
    """Create ``path`` with mode 0600 holding ``value``; never overwrites."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def ensure_token(conf: Path, label: str, pin_file: Path) -> None:
    """Initialise a SoftHSM token called ``label`` unless one exists; the PIN goes to
    ``pin_file`` (0600) and the SO PIN beside it. Idempotent."""
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHsmError("softhsm2-util not found: install the Debian package softhsm2")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    shown = subprocess.run(
        [util, "--show-slots"], env=env, capture_output=True, text=True, check=False
    )
    if _has_label(shown.stdout, label):
        if not pin_file.exists():
            raise SoftHsmError(f"token {label!r} exists but {pin_file} is missing")
        return
    pin = secrets.token_hex(16)
    so_pin = secrets.token_hex(16)
    write_secret(pin_file, pin)
    write_secret(pin_file.with_name("hsm.so-pin"), so_pin)
    # PINs are passed through argv because softhsm2-util has no other way; this runs once,
    # as the data directory's owner, on a development token.
    done = subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SoftHsmError(f"softhsm2-util --init-token failed: {done.stderr.strip()[:200]}")


def _has_label(slots_output: str, label: str) -> bool:
    return any(
        line.strip().startswith("Label:") and line.split(":", 1)[1].strip() == label
        for line in slots_output.splitlines()
    )
