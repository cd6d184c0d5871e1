"""The key schedule: when a key's scheduled rotation is due, who the scheduler acts as,
and what one scheduler run did. ``KeyService.run_due`` (kms/services/keys.py) does the
work; ``Cluster.scheduler_pass`` (kms/services/cluster.py) runs it once per lease.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from kms.services.model import Key, KeyState, Principal, Role

# Who the scheduler acts as: an in-memory admin, never stored, whose name no real principal
# can have (principal names cannot contain ':').
SCHEDULER = Principal(0, "system:scheduler", Role.ADMIN, datetime(1970, 1, 1, tzinfo=UTC))


@dataclass
class DueRun:
    """What one scheduler run did."""

    rotated: list[tuple[str, int]] = field(default_factory=list)  # (key id, new version)
    destroyed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # done meanwhile by another process
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key id, error code)


def next_rotation(key: Key) -> datetime | None:
    """When scheduled rotation is due (None: no period, or the key is not enabled)."""
    if key.rotation_period_days is None or key.state is not KeyState.ENABLED:
        return None
    return aware(key.rotated_at or key.created_at) + timedelta(days=key.rotation_period_days)


def is_overdue(key: Key, now: datetime) -> bool:
    """Whether the key's scheduled rotation is due at ``now``."""
    due = next_rotation(key)
    return due is not None and due <= now


def aware(when: datetime) -> datetime:
    """``when`` as an aware datetime: a naive time from storage is UTC."""
    return when if when.tzinfo else when.replace(tzinfo=UTC)
