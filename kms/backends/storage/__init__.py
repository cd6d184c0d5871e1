"""SQLAlchemy Core storage: SQLite by default, any SQLAlchemy URL by configuration."""

from kms.backends.storage.engine import make_engine
from kms.backends.storage.migrate import SchemaNotCurrent, upgrade
from kms.backends.storage.sql_storage import SqlStorage

__all__ = ["SchemaNotCurrent", "SqlStorage", "make_engine", "upgrade"]
