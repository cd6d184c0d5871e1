"""A small per-worker cache with a time limit. It holds data that never changes once
written (the wrapped material of a KEK version, the key an alias names), which saves a
database read per request, and the rows a principal's last decrypt of a key was decided
on, which admit a decrypt only provisionally: the decision at commit is made again on rows
read from the database, and refusals on rows the request read itself
(kms/services/key_work.py).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any


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
