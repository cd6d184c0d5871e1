"""A small per-worker cache with a time limit. It holds data that never changes once
written (the wrapped material of a KEK version), which saves a database read per request,
and the (key, grant) pair last read for a principal's decrypts, which admits a decrypt
only provisionally: the re-check at commit reads key state and grant from the database,
and refusals are made on data read by the request itself (kms/services/crypto.py).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kms.errors import DecryptionFailed
from kms.services.model import KekRef
from kms.services.ports import Tx


class LookupCache:
    def __init__(self, ttl: float = 1.0, capacity: int = 50_000) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._data: OrderedDict[tuple[Any, ...], tuple[Any, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> Any | None:
        if self._ttl <= 0:
            return None
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            if hit[1] < time.monotonic():
                del self._data[key]
                return None
            return hit[0]

    def drop(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            self._data.pop(key, None)

    def put(self, key: tuple[Any, ...], value: Any) -> None:
        if self._ttl <= 0 or value is None:
            return
        with self._lock:
            self._data[key] = (value, time.monotonic() + self._ttl)
            self._data.move_to_end(key)
            while len(self._data) > self._capacity:
                self._data.popitem(last=False)


def cached_kek(cache: LookupCache, tx: Callable[[], Tx], key_id: str, version: int) -> KekRef:
    """A KEK version's wrapped material (immutable, so the worker-wide cache serves it; on a
    miss read through ``tx()``); DecryptionFailed if the version does not exist."""
    ident = ("kek", key_id, version)
    kek: KekRef | None = cache.get(ident)
    if kek is None:
        kv = tx().key_version(key_id, version)
        if kv is None:
            raise DecryptionFailed(detail=f"unknown key version {version}")
        kek = KekRef(key_id, version, kv.wrapped, kv.root_label)
        cache.put(ident, kek)
    return kek
