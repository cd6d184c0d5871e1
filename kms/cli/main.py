"""Command definitions (see the package docstring)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import click

from kms.cli.backup import backup, restore
from kms.cli.common import clear_errors, client, data_dir_option, print_json, remote
from kms.cli.escrow import escrow
from kms.cli.rewrap import rewrap
from kms.services.keys import SCHEDULER

GUNICORN_CONF = Path(__file__).resolve().parents[2] / "deploy" / "gunicorn.conf.py"


@click.group()
@click.version_option(package_name="keyholder-kms")
def main() -> None:
    """Keyholder KMS: HSM-backed envelope encryption with an audit trail."""


main.add_command(escrow)
main.add_command(rewrap)
main.add_command(backup)
main.add_command(restore)


# -- local commands ---------------------------------------------------------------------


@main.command()
@data_dir_option
@click.option("--pkcs11-module", help="Use this PKCS#11 module instead of a SoftHSM token.")
@click.option("--token-label", help="Token label on that module (default kms).")
@click.option("--pin-file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--database-url", help="SQLAlchemy URL (default: SQLite in the data directory).")
def init(
    data_dir: Path,
    pkcs11_module: str | None,
    token_label: str | None,
    pin_file: Path | None,
    database_url: str | None,
) -> None:
    """Create or complete a data directory (idempotent)."""
    if pkcs11_module and not pin_file:
        raise click.UsageError("--pkcs11-module needs --pin-file")
    with clear_errors():
        from kms.bootstrap import init_data_dir

        report = init_data_dir(
            data_dir,
            pkcs11_module=pkcs11_module,
            token_label=token_label,
            pin_file=pin_file,
            database_url=database_url,
        )
    click.echo(f"data directory: {report.data_dir}")
    click.echo(f"HSM keys created: {', '.join(report.created_keys) or 'none (already present)'}")
    if report.admin_created:
        click.echo(f"admin token written to {report.admin_token_file} (mode 0600)")
    else:
        click.echo("admin already exists; no new token written")


@main.command()
@data_dir_option
def migrate(data_dir: Path) -> None:
    """Upgrade the database schema in place."""
    with clear_errors():
        from kms.bootstrap import migrate_database

        migrate_database(data_dir)
    click.echo("database schema is current")


@main.command()
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
    args = [gunicorn, "-c", gunicorn_conf, "--bind", bind, "--workers", str(workers)]
    if settings.tls_cert_file and settings.tls_key_file:  # HTTPS (the XKS proxy API needs it)
        args += ["--certfile", settings.tls_cert_file, "--keyfile", settings.tls_key_file]
    if settings.tls_client_ca_file:  # mutual TLS: no verified client certificate, no request
        args += ["--ca-certs", settings.tls_client_ca_file, "--cert-reqs", "2"]  # CERT_REQUIRED
    os.umask(0o077)  # database, WAL and logs created by the server stay private
    os.execv(gunicorn, [*args, "kms.wsgi:app"])  # noqa: S606 (becomes gunicorn)


@main.command("rotate-due")
@data_dir_option
def rotate_due(data_dir: Path) -> None:
    """Rotate keys whose rotation period has passed and destroy keys whose deletion date
    has passed (for cron or the systemd timer in deploy/; safe to run on several hosts
    at once). Exit 1 if any key failed."""
    with clear_errors():
        from kms.bootstrap import open_services
        from kms.services.audit import Caller

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


# -- remote commands --------------------------------------------------------------------


@main.group()
def principals() -> None:
    """Create and list principals."""


@principals.command("create")
@click.argument("name")
@click.option(
    "--role",
    required=True,
    type=click.Choice(["admin", "service", "auditor", "custodian", "requester"]),
)
@remote
def principals_create(name: str, role: str, url: str, token_file: Path | None) -> None:
    """Create a principal and print its token (shown once)."""
    with clear_errors():
        print_json(client(url, token_file).create_principal(name, role))


@principals.command("list")
@remote
def principals_list(url: str, token_file: Path | None) -> None:
    with clear_errors():
        print_json(client(url, token_file).list_principals())


@main.group()
def keys() -> None:
    """Create, inspect and change keys."""


@keys.command("create")
@click.option("--alias")
@click.option("--description", default="")
@remote
def keys_create(alias: str | None, description: str, url: str, token_file: Path | None) -> None:
    with clear_errors():
        print_json(client(url, token_file).create_key(alias, description))


@keys.command("list")
@remote
def keys_list(url: str, token_file: Path | None) -> None:
    with clear_errors():
        print_json(client(url, token_file).list_keys())


@keys.command("show")
@click.argument("ref")
@remote
def keys_show(ref: str, url: str, token_file: Path | None) -> None:
    with clear_errors():
        print_json(client(url, token_file).get_key(ref))


def _key_action(action: str, doc: str) -> None:
    @keys.command(action, help=doc)
    @click.argument("ref")
    @remote
    def command(ref: str, url: str, token_file: Path | None) -> None:
        with clear_errors():
            print_json(client(url, token_file).key_action(ref, action))


for _action, _doc in (
    ("rotate", "Add a new key version and make it current."),
    ("disable", "Refuse every use of the key until enabled."),
    ("enable", "Allow use of a disabled key again."),
    ("cancel-deletion", "Cancel a scheduled deletion (the key becomes disabled)."),
):
    _key_action(_action, _doc)


@keys.command("schedule-deletion")
@click.argument("ref")
@click.option("--pending-days", default=30, show_default=True, type=click.IntRange(7, 30))
@remote
def keys_schedule_deletion(ref: str, pending_days: int, url: str, token_file: Path | None) -> None:
    """Schedule deletion after a waiting period of 7 to 30 days."""
    with clear_errors():
        print_json(
            client(url, token_file).key_action(
                ref, "schedule-deletion", {"pending_days": pending_days}
            )
        )


@keys.command("config")
@click.argument("ref")
@click.option("--rotation-period-days", type=int, help="Rotate every N days (1..3650).")
@click.option("--no-rotation", is_flag=True, help="Turn scheduled rotation off.")
@click.option("--min-decryption-version", type=int, help="Refuse blobs under older versions.")
@remote
def keys_config(
    ref: str,
    rotation_period_days: int | None,
    no_rotation: bool,
    min_decryption_version: int | None,
    url: str,
    token_file: Path | None,
) -> None:
    """Set a key's rotation period and/or minimum decryption version."""
    settings: dict[str, int | None] = {}
    if no_rotation and rotation_period_days is not None:
        raise click.UsageError("give --rotation-period-days or --no-rotation, not both")
    if no_rotation or rotation_period_days is not None:
        settings["rotation_period_days"] = rotation_period_days
    if min_decryption_version is not None:
        settings["min_decryption_version"] = min_decryption_version
    if not settings:
        raise click.UsageError("nothing to change")
    with clear_errors():
        print_json(client(url, token_file).configure_key(ref, **settings))


@keys.command("retire")
@click.argument("ref")
@click.option("--up-to", required=True, type=click.IntRange(1), help="Last version to retire.")
@remote
def keys_retire(ref: str, up_to: int, url: str, token_file: Path | None) -> None:
    """Retire versions 1..N: their blobs are refused from now on (rewrap them first)."""
    with clear_errors():
        print_json(client(url, token_file).configure_key(ref, min_decryption_version=up_to + 1))


@keys.command("usage")
@click.argument("ref")
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 366))
@remote
def keys_usage(ref: str, days: int, url: str, token_file: Path | None) -> None:
    """Decrypts per version (count, last use) and per day, from the audit trail."""
    with clear_errors():
        print_json(client(url, token_file).key_usage(ref, days))


@main.group()
def grants() -> None:
    """Allow service principals to use keys."""


@grants.command("set")
@click.argument("ref")
@click.option("--principal", required=True)
@click.option(
    "--operations",
    required=True,
    help="Comma-separated: datakey,encrypt,decrypt,rewrap (empty string revokes).",
)
@remote
def grants_set(
    ref: str, principal: str, operations: str, url: str, token_file: Path | None
) -> None:
    ops = [o.strip() for o in operations.split(",") if o.strip()]
    with clear_errors():
        print_json(client(url, token_file).grant(ref, principal, ops))


@main.group()
def audit() -> None:
    """Read, export, verify and archive the audit trail."""


@audit.command("list")
@click.option("--after", default=0, show_default=True, type=click.IntRange(0))
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--key-id")
@click.option("--principal")
@click.option("--operation")
@click.option("--outcome")
@click.option("--case-id")
@click.option("--since", help="ISO 8601 date or time (inclusive).")
@click.option("--until", help="ISO 8601 date or time (exclusive).")
@remote
def audit_list(after: int, limit: int, url: str, token_file: Path | None, **filters: str) -> None:
    """Print records as JSON lines, in chain order."""
    chosen = {k: v for k, v in filters.items() if v is not None}
    with clear_errors():
        for record in client(url, token_file).audit(after, limit, **chosen):
            click.echo(json.dumps(record, sort_keys=True))


@audit.command("export")
@click.option(
    "--after", type=click.IntRange(0), help="Continue from this seq (default: the start)."
)
@click.option("--until", type=click.IntRange(0), help="Last seq (default: the current head).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Default: stdout.")
@remote
def audit_export(
    after: int | None, until: int | None, out: Path | None, url: str, token_file: Path | None
) -> None:
    """Write a self-contained bundle (records, checkpoints, public key) as JSON Lines."""
    with clear_errors():
        lines = client(url, token_file).export_audit(after, until)
        if out is None:
            for line in lines:
                click.echo(line.decode(), nl=False)
        else:
            with out.open("xb") as f:
                for line in lines:
                    f.write(line)
            click.echo(f"bundle written to {out}", err=True)


@audit.command("public-key")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Default: stdout.")
@remote
def audit_public_key(out: Path | None, url: str, token_file: Path | None) -> None:
    """The audit signing key (PEM). Fetch it once and keep it: verify against your copy."""
    with clear_errors():
        pem = client(url, token_file).audit_public_key()
        if out is None:
            click.echo(pem.decode(), nl=False)
        else:
            out.write_bytes(pem)


@audit.command("checkpoint")
@remote
def audit_checkpoint(url: str, token_file: Path | None) -> None:
    """Ask the server to sign a checkpoint of the chain head now (admin)."""
    with clear_errors():
        print_json(client(url, token_file).create_checkpoint())


@audit.command("checkpoints")
@click.option("--after", default=0, show_default=True, type=click.IntRange(0))
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@remote
def audit_checkpoints(after: int, limit: int, url: str, token_file: Path | None) -> None:
    """Print signed checkpoints as JSON lines (each usable as --since-checkpoint)."""
    with clear_errors():
        for cp in client(url, token_file).audit_checkpoints(after, limit):
            click.echo(json.dumps(cp, sort_keys=True))


@audit.command("report")
@click.option("--since", required=True, help="ISO 8601 date or time (inclusive).")
@click.option("--until", required=True, help="ISO 8601 date or time (exclusive).")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json")
@remote
def audit_report(since: str, until: str, fmt: str, url: str, token_file: Path | None) -> None:
    """Per key and per principal: operations, failures, unwraps by justification."""
    with clear_errors():
        result = client(url, token_file).audit_report(since, until, fmt)
    if fmt == "json":
        print_json(result)
    else:
        click.echo(result, nl=False)


@audit.command("verify")
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--public-key",
    "public_key",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The audit public key you trust (PEM), not the one in the bundle.",
)
@click.option(
    "--since-checkpoint",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A checkpoint you already hold (JSON); the bundle must continue from it.",
)
@click.option(
    "--through-checkpoint",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A later checkpoint you hold (JSON); the bundle must reach and match it.",
)
@click.option(
    "--max-unsigned",
    type=click.IntRange(0),
    help="Fail if more records than this follow the last checkpoint (the server's "
    "KMS_AUDIT_CHECKPOINT_RECORDS, e.g. 1000).",
)
def audit_verify(
    bundle: Path,
    public_key: Path,
    since_checkpoint: Path | None,
    through_checkpoint: Path | None,
    max_unsigned: int | None,
) -> None:
    """Verify a bundle offline. Exit 0 only if everything verifies (an unsigned tail is
    reported, not failed); 1 if anything is wrong; 2 if the inputs are unusable."""
    from kms.services.audit_verify import VerifyInputError, verify_bundle

    anchors = []
    for option, path in (
        ("--since-checkpoint", since_checkpoint),
        ("--through-checkpoint", through_checkpoint),
    ):
        try:
            anchor = json.loads(path.read_text()) if path else None
            if anchor is not None and not isinstance(anchor, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as e:
            click.echo(f"Error: {option}: {e}", err=True)
            sys.exit(2)
        anchors.append(anchor)
    try:
        with bundle.open("rb") as lines:
            report = verify_bundle(
                lines, public_key.read_bytes(), anchors[0], anchors[1], max_unsigned
            )
    except (VerifyInputError, OSError) as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    click.echo(report.summary())
    sys.exit(0 if report.ok else 1)


@audit.command("archive")
@data_dir_option
@click.option(
    "--through",
    required=True,
    type=click.IntRange(1),
    help="Archive records up to this seq, which must have a signed checkpoint.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def audit_archive(data_dir: Path, through: int, out: Path) -> None:
    """Export records up to a checkpoint to a bundle file, verify it, then remove them
    from the live database (run on the server host; the rest still verifies)."""
    with clear_errors():
        from kms.bootstrap import open_services

        with open_services(data_dir) as services, out.open("x") as f:
            result = services.exports.archive(through, f, lambda: out.open("rb"))
    click.echo(f"archived {result.records} records through seq {result.through} to {out}")
    click.echo(f"sha256 {result.sha256}")
