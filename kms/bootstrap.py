"""``kms init``: make a data directory ready to serve. Idempotent.

With no PKCS#11 options it creates a SoftHSM token inside the directory (development and
tests); given a module, token label and PIN file it uses that HSM instead. Then it creates
the root, audit signing and integrity keys if absent, brings the database schema up to date, and
creates the first admin, whose token goes to DATA_DIR/admin.token (mode 0600).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hsm_config import softhsm
from kms import config as config_mod
from kms.app import Services, build_services, hsm_config, options_from_settings
from kms.backends.hsm import Pkcs11Hsm, provision_keys
from kms.backends.storage import SqlStorage, make_engine, upgrade
from kms.backends.storage.migrate import check_current


@dataclass(frozen=True)
class InitReport:
    data_dir: Path
    created_keys: list[str]
    admin_token_file: Path
    admin_created: bool


def init_data_dir(
    data_dir: Path,
    *,
    pkcs11_module: str | None = None,
    token_label: str | None = None,
    pin_file: Path | None = None,
    database_url: str | None = None,
) -> InitReport:
    data_dir = data_dir.resolve()
    os.umask(0o077)  # everything in the data directory is private to its owner
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf_path = data_dir / config_mod.CONF_FILE
    if not conf_path.exists():
        lines = ["# Written by `kms init`; KMS_* environment variables override these."]
        if pkcs11_module:
            lines += [
                f"KMS_PKCS11_MODULE={pkcs11_module}",
                f"KMS_HSM_TOKEN_LABEL={token_label or 'kms'}",
                f"KMS_HSM_PIN_FILE={(pin_file or data_dir / 'hsm.pin').resolve()}",
            ]
        if database_url:
            lines.append(f"KMS_DATABASE_URL={database_url}")
        conf_path.write_text("\n".join(lines) + "\n")
        conf_path.chmod(0o600)
    env = {**os.environ, "KMS_DATA_DIR": str(data_dir)}
    conf = config_mod.read_conf_file(conf_path)
    if "KMS_PKCS11_MODULE" not in conf and "KMS_PKCS11_MODULE" not in os.environ:
        softhsm.write_config(data_dir)
        softhsm.ensure_token(
            data_dir / "softhsm2.conf", conf.get("KMS_HSM_TOKEN_LABEL", "kms"), data_dir / "hsm.pin"
        )
    settings = config_mod.from_env(env)
    created = provision_keys(hsm_config(settings))
    engine = make_engine(settings.database_url, settings.sqlite_synchronous)
    upgrade(engine)
    services = build_services(SqlStorage(engine), Pkcs11Hsm(hsm_config(settings)))
    token_file = data_dir / "admin.token"
    token = services.principals.bootstrap_admin("admin")
    if token is not None:
        if token_file.exists():
            token_file.unlink()
        softhsm.write_secret(token_file, token)
    engine.dispose()
    return InitReport(data_dir, created, token_file, token is not None)


def migrate_database(data_dir: Path) -> None:
    """Upgrade the configured database's schema in place (``kms migrate``)."""
    settings = config_mod.from_env({**os.environ, "KMS_DATA_DIR": str(data_dir.resolve())})
    engine = make_engine(settings.database_url, settings.sqlite_synchronous)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


@contextmanager
def open_services(data_dir: Path) -> Iterator[Services]:
    """The service layer over a data directory, for local operator commands."""
    settings = config_mod.from_env({**os.environ, "KMS_DATA_DIR": str(data_dir.resolve())})
    engine = make_engine(settings.database_url, settings.sqlite_synchronous)
    hsm = Pkcs11Hsm(hsm_config(settings))
    try:
        check_current(engine)
        yield build_services(SqlStorage(engine), hsm, options=options_from_settings(settings))
    finally:
        hsm.close()
        engine.dispose()
