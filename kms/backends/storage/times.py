"""Times read back from the database: every stored time is UTC, but SQLite returns naive
datetimes."""

from __future__ import annotations

from datetime import UTC, datetime


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def utc_or_none(value: datetime | None) -> datetime | None:
    """utc(), passing None through (nullable columns)."""
    return None if value is None else utc(value)
