"""``kms backup`` and ``kms restore``: a consistent copy of a data directory made by
``kms init`` (SQLite database + SoftHSM token), and its restoration into a fresh one.

A backup is only useful whole: the database holds every key version wrapped under the
HSM's root key, so the database without the token decrypts nothing, and the token
without the database knows no key. ``kms backup`` takes both, online, while the server
runs:

- the database through SQLite's online backup API (one read transaction: a consistent
  snapshot while writers go on; ``PRAGMA integrity_check`` on the copy);
- the token directory copied before and compared after the database copy, retried if it
  changed meanwhile (it changes only when HSM keys are created or rotated), so the two
  belong together;
- ``kms.conf`` and the PIN and admin token files, so the copy is self-sufficient: the
  backup is as secret as the data directory (mode 0700; keep it offline or encrypted).

Layout of OUT (written as OUT.partial, renamed when complete)::

    kms.sqlite3  tokens/...  kms.conf  hsm.pin  hsm.so-pin  admin.token
    MANIFEST.json   {"format": "kms-backup/1", "created": ISO 8601 UTC,
                     "audit_head_seq": N, "files": {relative path: sha256 hex}}

``kms restore BACKUP --data-dir NEW`` checks every checksum, copies into NEW (which must
not exist or be empty), writes NEW/softhsm2.conf for NEW/tokens, brings the schema up to
date, checks that the HSM, the database and the audit key answer, and appends a
``restore_backup`` audit record naming the backup: the restored chain continues the
backed-up one, and an auditor holding a later checkpoint sees the restore as a fork at
``audit_head_seq``. Any failure removes NEW again. Keys and key versions created after
the backup do not exist in it: their blobs are refused (``forbidden``, as a key without a
grant, audit detail "blob names an unknown key"; ``decryption_failed``, audit detail
"unknown key version N").

Only the default layout is handled (SQLite database and SoftHSM token inside the data
directory). PostgreSQL and hardware HSMs are backed up with ``pg_dump`` and the HSM
vendor's procedure (docs/operations.md, "Backup and restore"). The standard library ``sqlite3`` is
used directly on purpose: this is a file-level operator tool, like ``sqlite3 .backup``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from kms.cli.common import clear_errors, data_dir_option

FORMAT = "kms-backup/1"
MANIFEST = "MANIFEST.json"
DATABASE = "kms.sqlite3"
TOKENS = "tokens"
SIDE_FILES = ("kms.conf", "hsm.pin", "hsm.so-pin", "admin.token")
ATTEMPTS = 3


@click.command()
@data_dir_option
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
def backup(data_dir: Path, out: Path) -> None:
    """Copy the database and the SoftHSM token of a data directory, consistently and
    online, into a new directory OUT (see docs/operations.md, Backup and restore)."""
    with clear_errors():
        data_dir = data_dir.resolve()
        database, tokens = _default_layout(data_dir)
        if out.exists() or out.with_name(out.name + ".partial").exists():
            raise click.ClickException(f"{out} already exists: choose a new directory")
        os.umask(0o077)
        partial = out.with_name(out.name + ".partial")
        partial.mkdir(mode=0o700, parents=True)
        try:
            head = _copy_consistently(database, tokens, partial)
            for name in SIDE_FILES:
                if (data_dir / name).is_file():
                    shutil.copy2(data_dir / name, partial / name)
            manifest = {
                "format": FORMAT,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "audit_head_seq": head,
                "files": _checksums(partial),
            }
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            partial.rename(out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    click.echo(f"backup written to {out} (audit head seq {head}); it holds the HSM PIN:")
    click.echo("store it offline or encrypted, with the same care as the data directory")


@click.command()
@click.argument("source", type=click.Path(file_okay=False, exists=True, path_type=Path))
@data_dir_option
def restore(source: Path, data_dir: Path) -> None:
    """Restore a backup made by `kms backup` into a new data directory, verify it, and
    record the restore in its audit trail."""
    with clear_errors():
        manifest = _verified_manifest(source)
        if data_dir.exists() and any(data_dir.iterdir()):
            raise click.ClickException(f"{data_dir} is not empty: restore into a new directory")
        os.umask(0o077)
        created = not data_dir.exists()
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            _restore_files(source, data_dir, manifest)
            summary = _check_and_record(data_dir, manifest)
        except BaseException:
            if created:
                shutil.rmtree(data_dir, ignore_errors=True)
            else:
                for child in data_dir.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            raise
    click.echo(f"restored {source} into {data_dir}: {summary}")
    click.echo(
        f"keys and versions created after {manifest['created']} are not in this backup; "
        "blobs made under them cannot be decrypted here"
    )


# -- backup -----------------------------------------------------------------------------


def _default_layout(data_dir: Path) -> tuple[Path, Path]:
    """The SQLite file and the SoftHSM token directory of ``data_dir``; a ClickException
    naming the documented procedure for anything else."""
    from kms import config

    settings = config.from_env({**os.environ, "KMS_DATA_DIR": str(data_dir)})
    database = data_dir / DATABASE
    if settings.database_url != f"sqlite:///{database}":
        raise click.ClickException(
            "the database is not the SQLite file of the data directory: back it up with "
            "pg_dump (PostgreSQL) or `sqlite3 FILE .backup`; see docs/operations.md, "
            "Backup and restore"
        )
    tokens = data_dir / TOKENS
    conf = settings.softhsm2_conf
    if conf is None or Path(conf) != data_dir / "softhsm2.conf" or _tokendir(Path(conf)) != tokens:
        raise click.ClickException(
            "the HSM is not a SoftHSM token in the data directory: back it up with the HSM "
            "vendor's procedure and the database separately; see docs/operations.md, "
            "Backup and restore"
        )
    if not database.is_file() or not tokens.is_dir():
        raise click.ClickException(f"{data_dir} has no {DATABASE} or {TOKENS}/: not initialised")
    return database, tokens


def _tokendir(conf: Path) -> Path | None:
    for line in conf.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == "directories.tokendir":
            return Path(value.strip())
    return None


def _copy_consistently(database: Path, tokens: Path, out: Path) -> int | None:
    """Token copy, database snapshot, token unchanged since: else retry. Returns the
    audit head seq of the snapshot."""
    for _ in range(ATTEMPTS):
        before = _tree_digest(tokens)
        shutil.rmtree(out / TOKENS, ignore_errors=True)
        shutil.copytree(tokens, out / TOKENS)
        (out / DATABASE).unlink(missing_ok=True)
        head = _snapshot(database, out / DATABASE)
        if _tree_digest(tokens) == before == _tree_digest(out / TOKENS):
            return head
    raise click.ClickException(
        f"the HSM token kept changing during {ATTEMPTS} attempts (keys being created?): "
        "try again later"
    )


def _snapshot(database: Path, target: Path) -> int | None:
    """SQLite online backup of ``database`` into ``target``, integrity-checked."""
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        if copy.execute("PRAGMA integrity_check").fetchone() != ("ok",):
            raise click.ClickException("the database copy fails PRAGMA integrity_check")
        try:
            row = copy.execute("SELECT seq FROM audit_head").fetchone()
        except sqlite3.Error:
            row = None
        return int(row[0]) if row else None
    except sqlite3.Error as e:
        raise click.ClickException(f"database backup failed: {e}") from None
    finally:
        copy.close()
        source.close()


def _tree_digest(root: Path) -> str:
    return hashlib.sha256(json.dumps(_checksums(root), sort_keys=True).encode()).hexdigest()


def _checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


# -- restore ----------------------------------------------------------------------------


def _verified_manifest(source: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((source / MANIFEST).read_text())
    except (OSError, ValueError):
        raise click.ClickException(f"{source} is not a complete backup: no {MANIFEST}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise click.ClickException(f"{source}/{MANIFEST}: not a {FORMAT} backup")
    actual = _checksums(source)
    for name, digest in sorted(manifest["files"].items()):
        if actual.get(name) != digest:
            raise click.ClickException(f"backup damaged: {name} does not match its checksum")
    if DATABASE not in actual or not any(n.startswith(TOKENS + "/") for n in actual):
        raise click.ClickException(f"backup incomplete: needs {DATABASE} and {TOKENS}/")
    return manifest


def _restore_files(source: Path, data_dir: Path, manifest: dict[str, Any]) -> None:
    from hsm_config import softhsm

    for name in manifest["files"]:
        target = data_dir / name
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copy2(source / name, target)
        target.chmod(0o600)
    softhsm.write_config(data_dir)  # softhsm2.conf for data_dir/tokens


def _check_and_record(data_dir: Path, manifest: dict[str, Any]) -> str:
    """Schema up to date, HSM + database + audit key answering, restore recorded."""
    from kms.bootstrap import migrate_database, open_services
    from kms.services.audit_events import Caller, EventBuilder

    migrate_database(data_dir)
    with open_services(data_dir) as services:
        checks = services.health.readiness()
        failed = {name: code for name, code in checks.items() if code != "ok"}
        if failed:
            raise click.ClickException(f"the restored directory does not work: {failed}")
        op = EventBuilder(Caller(f"kms-restore-{uuid.uuid4().hex}", None), "restore_backup")
        detail = (
            f"backup created {manifest['created']}, audit head seq {manifest['audit_head_seq']}"
        )
        services.audit.record([op.ok(detail=detail)])
        services.audit.checkpoint_quietly()
    return f"HSM, database and audit key answer; {detail}"
