"""Commands run on the server host against a data directory: ``init``, ``migrate``,
``serve`` and ``rotate-due``. They open the data directory themselves instead of talking
to a server (``backup``/``restore`` are in backup.py, ``audit archive`` in audit.py)."""

from __future__ import annotations

import base64
import os
import shutil
import sys
import uuid
from pathlib import Path

import click

from hsm_config.profiles import PROFILES
from kms.cli.common import clear_errors, data_dir_option
from kms.services.rotation import SCHEDULER

EX_CONFIG = 78  # sysexits.h; deploy/systemd/kms.service does not restart on it
GUNICORN_CONF = Path(__file__).resolve().parents[2] / "deploy" / "gunicorn.conf.py"


@click.command()
@data_dir_option
@click.option("--pkcs11-module", help="Use this PKCS#11 module instead of a SoftHSM token.")
@click.option("--token-label", help="Token label on that module (default kms).")
@click.option("--pin-file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--hsm-profile",
    type=click.Choice(sorted(PROFILES)),
    help="Mechanism profile of that module (hsm_config/README.md; default softhsm).",
)
@click.option("--database-url", help="SQLAlchemy URL (default: SQLite in the data directory).")
@click.option(
    "--custodian",
    "custodians",
    multiple=True,
    metavar="NAME:GROUP:PUBLIC_KEY",
    help="Pin the first custodian of GROUP (public key: base64 from `kms escrow keygen`); "
    "repeatable. The API never adds a group's first member.",
)
@click.option(
    "--single-operator",
    is_flag=True,
    help="Development only: control-plane changes apply without approvals (dual control "
    "off). Pinned at the first init; shown on the dashboard and /readyz.",
)
def init(
    data_dir: Path,
    pkcs11_module: str | None,
    token_label: str | None,
    pin_file: Path | None,
    hsm_profile: str | None,
    database_url: str | None,
    custodians: tuple[str, ...],
    single_operator: bool,
) -> None:
    """Create or complete a data directory (idempotent)."""
    if pkcs11_module and not pin_file:
        raise click.UsageError("--pkcs11-module needs --pin-file")
    pins = [_custodian_option(value) for value in custodians]
    with clear_errors():
        from kms.bootstrap import init_data_dir

        report = init_data_dir(
            data_dir,
            pkcs11_module=pkcs11_module,
            token_label=token_label,
            pin_file=pin_file,
            hsm_profile=hsm_profile,
            database_url=database_url,
            custodians=pins,
            single_operator=single_operator,
        )
    click.echo(f"data directory: {report.data_dir}")
    click.echo(f"HSM keys created: {', '.join(report.created_keys) or 'none (already present)'}")
    _report_secured(report.anchored_chain, report.sealed_rows)
    if report.admin_created:
        click.echo(f"admin token written to {report.admin_token_file} (mode 0600)")
    else:
        click.echo("admin already exists; no new token written")
    for name, group, token_path in report.pinned:
        where = f"; its token written to {token_path} (mode 0600)" if token_path else ""
        click.echo(f"custodian {name} pinned in group {group}{where}")
    click.echo(f"control policy: {report.control}")


def _custodian_option(value: str) -> tuple[str, str, bytes]:
    """``NAME:GROUP:PUBLIC_KEY`` of --custodian, the key decoded (a UsageError if bad)."""
    name, group, key = [*value.split(":", 2), "", ""][:3]
    try:
        raw = base64.b64decode(key, validate=True)
    except ValueError:
        raw = b""
    if not name or not group or len(raw) != 32:
        raise click.UsageError(
            f"--custodian {value!r}: expected NAME:GROUP:PUBLIC_KEY with a base64 32-byte key"
        )
    return name, group, raw


@click.command()
@data_dir_option
def migrate(data_dir: Path) -> None:
    """Upgrade the database schema in place."""
    with clear_errors():
        from kms.bootstrap import migrate_database

        chain_id, sealed = migrate_database(data_dir)
    click.echo("database schema is current")
    _report_secured(chain_id, sealed)


def _report_secured(chain_id: str | None, sealed: dict[str, int]) -> None:
    if chain_id:
        click.echo(f"audit chain {chain_id} anchored in the HSM")
    if sealed:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(sealed.items()))
        click.echo(f"sealed rows made before row seals existed, trusted as found: {counts}")


@click.command()
@data_dir_option
@click.option("--bind", default="127.0.0.1:8200", show_default=True)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--config",
    "gunicorn_conf",
    type=click.Path(dir_okay=False, exists=True),
    default=str(GUNICORN_CONF),
    show_default=True,
)
def serve(data_dir: Path, bind: str, workers: int, gunicorn_conf: str) -> None:
    """Run the server under gunicorn in the foreground."""
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which(
        "gunicorn"
    )
    if gunicorn is None:
        raise click.ClickException("gunicorn is not installed")
    if not (data_dir / "kms.conf").exists():
        raise click.ClickException(f"{data_dir} is not initialised: run `kms init` first")
    os.environ["KMS_DATA_DIR"] = str(data_dir.resolve())
    with clear_errors():  # a bad setting is one clear line here, not a crash in each worker
        from kms import config

        settings = config.from_env()
        from kms.bootstrap import preflight_hsm
        from kms.errors import PreflightFailed

        try:
            preflight_hsm(settings)  # in a child: this process never loads PKCS#11
        except PreflightFailed as e:
            if not e.permanent:
                raise
            # EX_CONFIG: the unit's RestartPreventExitStatus, so a bad PIN is never
            # tried again in a restart loop (HSMs lock a partition after a few)
            click.echo(f"Error: {e.code}: {e.message} ({e.detail})", err=True)
            sys.exit(EX_CONFIG)
    args = [gunicorn, "-c", gunicorn_conf, "--bind", bind, "--workers", str(workers)]
    if settings.tls_cert_file and settings.tls_key_file:  # HTTPS (the XKS proxy API needs it)
        args += ["--certfile", settings.tls_cert_file, "--keyfile", settings.tls_key_file]
    if settings.tls_client_ca_file:  # mutual TLS: no verified client certificate, no request
        args += ["--ca-certs", settings.tls_client_ca_file, "--cert-reqs", "2"]  # CERT_REQUIRED
    os.umask(0o077)  # database, WAL and logs created by the server stay private
    os.execv(gunicorn, [*args, "kms.wsgi:app"])  # noqa: S606 (becomes gunicorn)


@click.command("rotate-due")
@data_dir_option
def rotate_due(data_dir: Path) -> None:
    """Rotate keys whose rotation period has passed and destroy keys whose deletion date
    has passed (for cron or the systemd timer in deploy/; safe to run on several hosts
    at once). Exit 1 if any key failed."""
    with clear_errors():
        from kms.bootstrap import open_services
        from kms.services.audit_events import Caller

        with open_services(data_dir) as services:
            caller = Caller(f"scheduler-{uuid.uuid4().hex}", SCHEDULER)
            run = services.cluster.scheduler_pass(services.keys, caller)
    if run is None:  # the Redis lease is held: a pass is running elsewhere right now
        click.echo("another scheduler pass is running; nothing done here")
        sys.exit(0)
    for key_id, version in run.rotated:
        click.echo(f"rotated {key_id} to version {version}")
    for key_id in run.destroyed:
        click.echo(f"destroyed {key_id}")
    for key_id, code in run.failed:
        click.echo(f"failed {key_id}: {code}", err=True)
    click.echo(
        f"{len(run.rotated)} rotated, {len(run.destroyed)} destroyed, "
        f"{len(run.skipped)} done elsewhere, {len(run.failed)} failed"
    )
    sys.exit(1 if run.failed else 0)
