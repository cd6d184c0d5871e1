"""Worker caches of sealed look-ups that follow the HSM state anchor
(kms/services/state_index.py ``StateIndex.version``): an entry read at change n holds
while the anchor is at n, so a sealed change (a principal disabled, a credential revoked)
reaches every worker and node at its next request (kms/services/principals.py,
sigv4.py)."""

from __future__ import annotations

from collections.abc import Callable

from kms.errors import HsmUnavailable

HSM_DOWN = -1  # cache_version(): the HSM does not answer


def cache_version(read: Callable[[], int | None]) -> int | None:
    """``read()`` (StateIndex.version) for a cache of sealed look-ups: an entry read at
    change n holds while the version is n. HSM_DOWN if the HSM does not answer: no sealed
    change can commit then (each moves the anchor), so a cache may keep serving its
    entries for their usual time. None: not anchored, cache nothing."""
    try:
        return read()
    except HsmUnavailable:
        return HSM_DOWN


def still_valid(read_at: int, version: int | None) -> bool:
    """Whether a cache entry read at change ``read_at`` holds at ``version``."""
    return version is not None and version in (read_at, HSM_DOWN)
