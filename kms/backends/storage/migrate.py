"""Schema migrations (Alembic), run by ``kms init`` / ``kms migrate``, never by workers."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).with_name("migrations")


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
    """Bring the database to ``target`` (the newest revision) in place, keeping its data."""
    cfg = _config(extra_versions)
    with engine.begin() as conn:
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
