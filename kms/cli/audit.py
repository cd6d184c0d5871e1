"""``kms audit``: read, export, verify and archive the audit trail.

``verify`` works offline on a bundle and the public key you trust (and a state export);
``archive``, ``accept-state`` and ``export-state`` run on the server host against the data
directory; the others talk to a running server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from kms.cli.common import clear_errors, client, data_dir_option, print_json, remote
from kms.formats.bundle import MAX_LINE_BYTES
from kms.formats.state_export import MAX_BYTES as MAX_STATE_BYTES
from kms.services.audit_verify import DEFAULT_MAX_UNSIGNED

if TYPE_CHECKING:
    from kms.formats.state_export import StateExport
    from kms.services.state_export import StateSnapshot


@click.group()
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
@click.option(
    "--context",
    "context_json",
    help="Only the records of this encryption context, a JSON object such as "
    '\'{"patient": "p-1"}\'. The server matches its keyed hash; the query is audited.',
)
@remote
def audit_list(
    after: int,
    limit: int,
    url: str,
    token_file: Path | None,
    context_json: str | None,
    **filters: str,
) -> None:
    """Print records as JSON lines, in chain order."""
    chosen = {k: v for k, v in filters.items() if v is not None}
    context = None
    if context_json is not None:
        try:
            context = json.loads(context_json)
        except ValueError:
            raise click.BadParameter("not valid JSON", param_hint="--context") from None
        if not isinstance(context, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--context")
    with clear_errors():
        kms = client(url, token_file)
        if context is None:
            records = kms.audit(after, limit, **chosen)
        else:
            records = kms.audit_by_context(context, after, limit, **chosen)
        for record in records:
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
    "--witnessed",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Checkpoints you received (JSON lines: `kms audit checkpoints` output or the "
    "audit_checkpoint webhook bodies); each one must be in the bundle, identical.",
)
@click.option(
    "--max-unsigned",
    type=click.IntRange(0),
    help=f"Fail if more records than this follow the last signature (default "
    f"{DEFAULT_MAX_UNSIGNED}, the server's default KMS_AUDIT_CHECKPOINT_RECORDS).",
)
@click.option(
    "--allow-unsigned",
    is_flag=True,
    help="Also accept a bundle that no checkpoint signature covers, and (without "
    "--max-unsigned) an unsigned tail of any length; reported as NOT VERIFIED BY SIGNATURE.",
)
@click.option(
    "--state",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A state export (`kms audit export-state`); its sealed rows must be those the "
    "bundle's checkpoint at the same state change signed.",
)
def audit_verify(
    bundle: Path,
    public_key: Path,
    since_checkpoint: Path | None,
    through_checkpoint: Path | None,
    witnessed: Path | None,
    max_unsigned: int | None,
    allow_unsigned: bool,
    state: Path | None,
) -> None:
    """Verify a bundle offline. Exit 0 only if everything verifies: a bundle no signature
    covers, or with more than --max-unsigned records after its last signature, fails
    unless loosened explicitly; 1 if anything is wrong; 2 if the inputs are unusable."""
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
            _unusable(f"{option}: {e}")
        anchors.append(anchor)
    held = _read_witnessed(witnessed) if witnessed else []
    sealed = _read_state(state) if state else None
    if max_unsigned is None and not allow_unsigned:
        max_unsigned = DEFAULT_MAX_UNSIGNED
    try:
        with bundle.open("rb") as lines:
            report = verify_bundle(
                lines,
                public_key.read_bytes(),
                anchors[0],
                anchors[1],
                max_unsigned,
                allow_unsigned=allow_unsigned,
                witnessed=held,
                state=sealed,
            )
    except (VerifyInputError, OSError) as e:
        _unusable(str(e))
    click.echo(report.summary())
    sys.exit(0 if report.ok else 1)


def _read_witnessed(path: Path) -> list[dict[str, Any]]:
    """The checkpoints of a --witnessed file: one JSON object a line, a checkpoint or a
    webhook body carrying one (``{"event": "audit_checkpoint", "checkpoint": {...}}``)."""
    found = []
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                if len(raw) > MAX_LINE_BYTES:
                    raise ValueError(f"line {number}: line too long")
                try:
                    obj = json.loads(raw)
                except (ValueError, RecursionError):
                    raise ValueError(f"line {number}: not valid JSON") from None
                if isinstance(obj, dict) and isinstance(obj.get("checkpoint"), dict):
                    obj = obj["checkpoint"]
                if not isinstance(obj, dict):
                    raise ValueError(f"line {number}: not a checkpoint (a JSON object)")
                obj.pop("type", None)
                found.append(obj)
    except (ValueError, OSError) as e:
        _unusable(f"--witnessed: {e}")
    return found


def _read_state(path: Path) -> StateExport:
    """The state export of a --state file (kms/formats/state_export.py)."""
    from kms.formats.state_export import StateExportError, decode

    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise StateExportError(f"larger than {MAX_STATE_BYTES} bytes")
        return decode(path.read_bytes())
    except (StateExportError, OSError) as e:
        _unusable(f"--state: {e}")


def _unusable(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(2)


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


@audit.command("accept-state")
@data_dir_option
@click.option("--reason", required=True, help="Why (a ticket, the restore being done); recorded.")
@click.option("--yes", is_flag=True, help="Accept without asking (scripts).")
def audit_accept_state(data_dir: Path, reason: str, yes: bool) -> None:
    """Accept the database's audit chain as it is and re-anchor the HSM on its head (run on
    the server host). Needed after restoring an older backup or when the chain does not
    extend the head the HSM anchored; the acceptance is itself chained and signed."""
    with clear_errors():
        from kms.bootstrap import open_services
        from kms.errors import AuditStateRefused

        with open_services(data_dir) as services:
            try:
                services.audit.verify_anchor()
                problem = None
            except AuditStateRefused as e:
                problem = e.detail
            click.echo(f"current state: {problem or 'the chain extends its HSM anchor'}")
            if not yes and not click.confirm("Accept this database's audit chain?"):
                click.echo("nothing changed", err=True)
                sys.exit(1)
            _, chain_id = services.audit.accept_state(reason[:120])
            checkpoint = services.audit.checkpoint()
    seq = checkpoint["seq"] if checkpoint else 0
    click.echo(f"accepted: audit chain {chain_id} anchored and signed at seq {seq}")


@audit.command("export-state")
@data_dir_option
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="Default: stdout (JSON)."
)
def audit_export_state(data_dir: Path, out: Path | None) -> None:
    """Write the sealed rows, checked against the HSM state anchor, at the state change a
    checkpoint signed now carries (run on the server host; recorded as export_state).
    Export the bundle afterwards and give this file to `kms audit verify --state`."""
    with clear_errors():
        target = out.open("xb") if out is not None else None  # never overwrites a file
        try:
            snapshot = _export_state(data_dir)
        except BaseException:
            if target is not None and out is not None:  # nothing exported: no file left
                target.close()
                out.unlink()
            raise
        if target is None:
            click.echo(snapshot.data, nl=False)
        else:
            with target:
                target.write(snapshot.data)
    click.echo(
        f"sealed state at change {snapshot.state_seq}: {snapshot.rows} rows, signed in the "
        f"checkpoint at seq {snapshot.checkpoint['seq']}" + (f"; written to {out}" if out else ""),
        err=True,
    )


def _export_state(data_dir: Path) -> StateSnapshot:
    from kms.bootstrap import open_services
    from kms.errors import AuditStateRefused
    from kms.services.state_export import export_state

    with open_services(data_dir) as services:
        try:
            return export_state(services.audit)
        except AuditStateRefused as e:  # the operator on the host gets the precise reason
            raise click.ClickException(f"{e.code}: {e.detail or e.message}") from None
