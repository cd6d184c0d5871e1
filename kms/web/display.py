"""How the dashboard writes times and durations (UTC, minutes)."""

from __future__ import annotations

from datetime import datetime, timedelta


def when(value: datetime | str | None) -> str:
    """A datetime or an audit record time ("2024-05-01T12:00:00.000Z") to the minute, UTC."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value[:16].replace("T", " ") + " UTC"
    return value.strftime("%Y-%m-%d %H:%M UTC")


def age(value: timedelta) -> str:
    """A duration in its two largest units: "3 d 4 h", "2 h 5 min", "7 min"."""
    seconds = int(value.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {rest // 60} min"
    return f"{rest // 60} min"
