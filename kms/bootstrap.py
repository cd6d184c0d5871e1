"""``kms init``: make a data directory ready to serve. Idempotent.

With no PKCS#11 options it creates a SoftHSM token inside the directory (development and
tests); given a module, token label and PIN file it uses that HSM instead. Then it creates
the root, audit signing and integrity keys if absent, brings the database schema up to date, and
creates the first admin, whose token goes to DATA_DIR/admin.token (mode 0600).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hsm_config import softhsm
from kms import config as config_mod
from kms.app import Services, build_services, hsm_config, options_from_settings
from kms.backends.hsm import Pkcs11Hsm, provision_keys
from kms.backends.hsm.preflight import run_preflight
from kms.backends.storage import SqlStorage, make_engine, upgrade
from kms.backends.storage.migrate import check_current
from kms.services.audit_events import local_event
from kms.services.seals import seal_unsealed_rows


@dataclass(frozen=True)
class InitReport:
    data_dir: Path
    created_keys: list[str]
    admin_token_file: Path
    admin_created: bool
    anchored_chain: str | None  # the audit chain anchored in the HSM now (None: already)
    sealed_rows: dict[str, int]  # rows made before row seals existed, sealed now
    # custodians pinned now: (name, group, file holding the token of its new principal)
    pinned: list[tuple[str, str, Path | None]] = field(default_factory=list)
    control: str = ""  # the control policy in force (ControlPolicy.summary())


def _same_choices(recorded: dict[str, str], chosen: dict[str, str], path: Path) -> None:
    """ConfigError if an option of this run differs from what the first run recorded
    (silently keeping the old module or label would send the operator after the wrong
    fault)."""
    for key, value in chosen.items():
        if recorded.get(key) != value:
            raise config_mod.ConfigError(
                f"{path} records {key}={recorded.get(key, '(unset)')}, not {value}; edit or "
                "remove it to change it"
            )


def preflight_hsm(settings: config_mod.Settings) -> list[str]:
    """The HSM preflight (kms/backends/hsm/preflight.py) in a child process; the steps
    passed, or PreflightFailed naming the step and the reason."""
    return run_preflight(hsm_config(settings))


def init_data_dir(
    data_dir: Path,
    *,
    pkcs11_module: str | None = None,
    token_label: str | None = None,
    pin_file: Path | None = None,
    hsm_profile: str | None = None,
    database_url: str | None = None,
    custodians: Sequence[tuple[str, str, bytes]] = (),
    single_operator: bool = False,
) -> InitReport:
    """Create or complete a data directory (idempotent); ``custodians`` (name, group,
    raw Ed25519 public key) are pinned as the first members of their groups
    (CustodianService.pin_custodian), each new principal's token written beside the
    admin's (custodian-<name>.token, mode 0600) for handing over. The control policy
    (dual control, or ``single_operator`` for development) is pinned in the sealed state
    on the first run (kms/services/changes.py); later runs report the one in force."""
    data_dir = data_dir.resolve()
    os.umask(0o077)  # everything in the data directory is private to its owner
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf_path = data_dir / config_mod.CONF_FILE
    chosen: dict[str, str] = {}  # what this first run records in kms.conf
    if pkcs11_module:
        chosen["KMS_PKCS11_MODULE"] = pkcs11_module
        chosen["KMS_HSM_TOKEN_LABEL"] = token_label or "kms"
        chosen["KMS_HSM_PIN_FILE"] = str((pin_file or data_dir / "hsm.pin").resolve())
    if hsm_profile:
        chosen["KMS_HSM_PROFILE"] = hsm_profile
    if database_url:
        chosen["KMS_DATABASE_URL"] = database_url
    if single_operator:
        chosen["KMS_CONTROL_MODE"] = "single-operator"
    first_run = not conf_path.exists()
    conf = chosen if first_run else config_mod.read_conf_file(conf_path)
    if not first_run:
        _same_choices(conf, chosen, conf_path)
    env = {**os.environ, **conf, "KMS_DATA_DIR": str(data_dir)}  # (kms.conf: under env)
    env = {**env, **{k: v for k, v in os.environ.items() if k.startswith("KMS_")}}
    if single_operator:
        env["KMS_CONTROL_MODE"] = "single-operator"
    if "KMS_PKCS11_MODULE" not in conf and "KMS_PKCS11_MODULE" not in os.environ:
        softhsm.write_config(data_dir)
        softhsm.ensure_token(
            data_dir / "softhsm2.conf", conf.get("KMS_HSM_TOKEN_LABEL", "kms"), data_dir / "hsm.pin"
        )
    settings = config_mod.from_env(env)
    preflight_hsm(settings)  # before anything is created in the token
    if first_run:  # only a configuration that passed the preflight is recorded
        lines = ["# Written by `kms init`; KMS_* environment variables override these."]
        conf_path.write_text("\n".join([*lines, *(f"{k}={v}" for k, v in chosen.items())]) + "\n")
        conf_path.chmod(0o600)
    created = provision_keys(hsm_config(settings))
    engine = make_engine(settings.database_url, settings.sqlite_synchronous)
    upgrade(engine)
    hsm = Pkcs11Hsm(hsm_config(settings))
    try:
        storage = SqlStorage(engine)
        services = build_services(storage, hsm, options=options_from_settings(settings))
        chain_id, sealed = secure_database(storage, services)
        token_file = data_dir / "admin.token"
        token = services.principals.bootstrap_admin("admin")
        if token is not None:
            if token_file.exists():
                token_file.unlink()
            softhsm.write_secret(token_file, token)
        pinned = []
        for name, group, public_key in custodians:
            custodian_token = services.custodians.pin_custodian(name, group, public_key)
            path = data_dir / f"custodian-{name}.token" if custodian_token else None
            if path is not None and custodian_token is not None:
                path.unlink(missing_ok=True)
                softhsm.write_secret(path, custodian_token)
            pinned.append((name, group, path))
        control = services.changes.pin().summary()
    finally:
        hsm.close()
        engine.dispose()
    return InitReport(
        data_dir, created, token_file, token is not None, chain_id, sealed, pinned, control
    )


def secure_database(
    storage: SqlStorage, services: Services, allow_other_chains: bool = False
) -> tuple[str | None, dict[str, int]]:
    """What a database needs before a server may use it, once its schema is current: its
    audit chain anchored in the HSM and its rows made before row seals existed sealed as
    found (kms/services/audit_anchor.py, seals.py). Both happen once, in the run that
    anchors the chain (a new database, or one from before anchors and seals): afterwards
    an unsealed row is something the database writer made, and stays refused."""
    chain_id = services.audit.anchor_new_chain(allow_other_chains)
    anchor_sealed_state(storage, services, new_chain=chain_id is not None)
    if chain_id is None:
        return None, {}
    return chain_id, seal_unsealed_rows(storage, services.audit)


def anchor_sealed_state(storage: SqlStorage, services: Services, new_chain: bool) -> None:
    """Anchor the sealed rows' state in the HSM (kms/services/state_index.py) where the
    chain has no state anchor yet: with a new chain (before its rows are sealed: sealing
    them is then a logged change), or a chain anchored before freshness existed (its
    state log is empty), whose rows are trusted as found, which the audit trail records.
    A chain whose state was anchored once and whose anchor is gone is left alone: the
    server refuses it until an operator runs ``kms audit accept-state``."""
    with storage.reader() as tx:
        chain_id = tx.audit_chain_id()
        logged = tx.state_seq()
    if chain_id is None or services.state.anchored(chain_id) or (logged and not new_chain):
        return
    if not new_chain:
        services.audit.record([local_event("anchor_sealed_state", "rows trusted as found")])
    services.state.anchor(chain_id)


def migrate_database(data_dir: Path) -> tuple[str | None, dict[str, int]]:
    """Upgrade the configured database's schema in place, then secure_database() it
    (``kms migrate``): the anchored chain id if it was anchored now, the rows sealed."""
    settings = config_mod.from_env({**os.environ, "KMS_DATA_DIR": str(data_dir.resolve())})
    engine = make_engine(settings.database_url, settings.sqlite_synchronous)
    hsm = Pkcs11Hsm(hsm_config(settings))
    try:
        upgrade(engine)
        storage = SqlStorage(engine)
        return secure_database(storage, build_services(storage, hsm))
    finally:
        hsm.close()
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
