"""Loading the rows of a listing when the database writer may have put a value in one
that does not even load (SQLite keeps any text in any column, and SQLAlchemy converts a
time column while it fetches): such a row is left out, alarmed, instead of failing the
whole listing (kms/services/seals.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import Column
from sqlalchemy.engine import Connection

from kms.errors import SealBroken
from kms.services.seals import parsed

T = TypeVar("T")


def checked_rows(
    conn: Connection, query: Any, ident: Column[Any], kind: str, check: Callable[[Any], T]
) -> list[T]:
    """``check(row)`` of every row of ``query`` (a select ordered as wanted); a row that
    does not load, or whose ``check`` raises SealBroken, is left out. Rows load all at
    once, or one by one (by ``ident``, their key column) if that fails."""
    try:
        rows = conn.execute(query).all()
    except (ValueError, TypeError):
        rows = []
        for value in conn.execute(query.with_only_columns(ident)).scalars().all():
            one = query.where(ident == value)
            with contextlib.suppress(SealBroken):
                rows.append(parsed(kind, value, partial(_one, conn, one)))
    found = []
    for row in rows:
        with contextlib.suppress(SealBroken):
            found.append(check(row))
    return found


def _one(conn: Connection, query: Any) -> Any:
    return conn.execute(query).one()


def mechanism_name(value: Any) -> str:
    """A recorded key-wrap mechanism (``wrap_mechanism`` column) as read: ValueError
    unless a non-empty string (SQLite keeps a number or bytes there too), so the row is
    malformed for parsed() rather than failing later."""
    if not isinstance(value, str) or not value:
        raise ValueError("wrap_mechanism is not a mechanism name")
    return value
