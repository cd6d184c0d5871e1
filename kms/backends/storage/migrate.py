"""Schema migrations (Alembic), run by ``kms init`` / ``kms migrate``, never by workers."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger("kms.storage")
MIGRATIONS = Path(__file__).with_name("migrations")
# pg_advisory_xact_lock key serialising migrations ("kms-migr" as a big-endian int64).
MIGRATION_LOCK_KEY = int.from_bytes(b"kms-migr", "big")


class SchemaNotCurrent(RuntimeError):
    """The database is not at the schema this code expects; run ``kms migrate``."""


def _config(extra_versions: list[Path] | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    locations = [MIGRATIONS / "versions", *(extra_versions or [])]
    cfg.set_main_option("version_locations", " ".join(str(p) for p in locations))
    cfg.set_main_option("path_separator", "space")
    return cfg


def upgrade(
    engine: Engine, extra_versions: list[Path] | None = None, target: str = "heads"
) -> None:
    """Bring the database to ``target`` (the newest revision) in place, keeping its data,
    in one transaction. On PostgreSQL concurrent upgrades (two nodes' ``kms init``) take
    turns on an advisory lock; statements have no time limit here, and lock waits (for
    another upgrade, or for tables that running nodes use) up to a minute each."""
    cfg = _config(extra_versions)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
            conn.exec_driver_sql("SET LOCAL lock_timeout = '60s'")
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, target)


def check_current(engine: Engine) -> None:
    """Raise SchemaNotCurrent unless the database is at the newest revision."""
    heads = set(ScriptDirectory.from_config(_config()).get_heads())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    if current != heads:
        raise SchemaNotCurrent(
            f"database schema is at {sorted(current) or 'nothing'}, code needs {sorted(heads)}: "
            "run `kms migrate`"
        )


def check_current_if_reachable(engine: Engine) -> bool:
    """check_current() for a server process starting: SchemaNotCurrent if the database
    answers with another schema, True if it is current, False (logged) if it does not
    answer. The process can then start during a database outage and answer 503 until
    the database is back (/readyz says why): gunicorn stops the whole server when a
    worker fails to start, so a strict check there turns a database restart that
    coincides with a worker restart into an outage of the KMS."""
    try:
        check_current(engine)
    except SQLAlchemyError as e:
        log.warning(
            "database unreachable at start; serving 503 until it answers",
            extra={"detail": type(e).__name__},
        )
        return False
    return True
