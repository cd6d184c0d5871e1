"""Client-side data-key caching, off by default (as in the AWS Encryption SDK's caching
materials manager): reuse one data key for several envelopes, within limits.

Reusing a DEK trades isolation for fewer KMS calls: everything sealed under one cached
DEK is exposed together if that DEK leaks, and the KMS audit trail sees one ``datakey``
for many messages. Each entry is bounded by age, number of messages and bytes; any limit
reached retires it. Envelopes sealed under a cached DEK get distinct nonce prefixes (3
random bytes fixed per entry, then a 4-byte message counter), so no AES-GCM nonce repeats
under one DEK however many messages share it.

Unwrapped DEKs can be cached for decryption too (same age limit), keyed by the wrapped
DEK and the encryption context, so opening many envelopes that share a DEK costs one
``decrypt`` call. Thread-safe. Key material is never in ``repr`` and cannot be pickled.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kms.client.http import DataKey, KmsClientError
from kms.formats import context as ctx

MAX_MESSAGES_LIMIT = 2**32
_PREFIX_BASE_BYTES = 3


@dataclass
class _Entry:
    datakey: DataKey = field(repr=False)
    created: float
    prefix_base: bytes
    messages: int = 0
    bytes: int = 0


class DataKeyCache:
    def __init__(
        self,
        *,
        max_age_seconds: float,
        max_messages: int,
        max_bytes: int,
        capacity: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < max_age_seconds <= 86400:
            raise KmsClientError("invalid_config", "max_age_seconds must be in (0, 86400]")
        if not 1 <= max_messages <= MAX_MESSAGES_LIMIT:
            raise KmsClientError("invalid_config", f"max_messages must be 1..{MAX_MESSAGES_LIMIT}")
        if max_bytes < 1 or capacity < 1:
            raise KmsClientError("invalid_config", "max_bytes and capacity must be positive")
        self._max_age = max_age_seconds
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._seal: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()
        self._open: OrderedDict[tuple[bytes, bytes], tuple[bytes, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return (
            f"DataKeyCache(max_age_seconds={self._max_age}, max_messages={self._max_messages},"
            f" max_bytes={self._max_bytes}, entries={len(self._seal) + len(self._open)})"
        )

    def __reduce__(self) -> Any:
        raise TypeError("a DataKeyCache holds key material and cannot be pickled")

    def for_sealing(
        self, key: str, context: dict[str, str], size: int, fetch: Callable[[], DataKey]
    ) -> tuple[DataKey, bytes]:
        """A data key for one envelope of ``size`` bytes, and the nonce prefix it must use.
        Calls ``fetch`` (one ``datakey``) when no cached entry has room left."""
        if size > self._max_bytes:
            raise KmsClientError("invalid_request", "the message is larger than max_bytes")
        ident = (key, ctx.encode(context))
        now = self._clock()
        with self._lock:
            entry = self._seal.get(ident)
            if entry is not None and (
                now - entry.created >= self._max_age
                or entry.messages >= self._max_messages
                or entry.bytes + size > self._max_bytes
            ):
                del self._seal[ident]
                entry = None
            if entry is not None:
                self.hits += 1
                return self._use(ident, entry, size)
            self.misses += 1
        fresh = _Entry(fetch(), now, os.urandom(_PREFIX_BASE_BYTES))
        with self._lock:
            self._seal[ident] = fresh
            while len(self._seal) > self._capacity:
                self._seal.popitem(last=False)
            return self._use(ident, fresh, size)

    def _use(self, ident: tuple[str, bytes], entry: _Entry, size: int) -> tuple[DataKey, bytes]:
        counter = entry.messages
        entry.messages += 1
        entry.bytes += size
        self._seal.move_to_end(ident)
        return entry.datakey, entry.prefix_base + counter.to_bytes(4, "big")

    def for_opening(
        self, wrapped: bytes, context: dict[str, str], unwrap: Callable[[bytes], bytes]
    ) -> bytes:
        """The DEK for a wrapped DEK, from the cache or one ``unwrap`` call."""
        ident = (hashlib.sha256(wrapped).digest(), ctx.encode(context))
        now = self._clock()
        with self._lock:
            hit = self._open.get(ident)
            if hit is not None and now - hit[1] < self._max_age:
                self._open.move_to_end(ident)
                self.hits += 1
                return hit[0]
            self.misses += 1
        dek = unwrap(wrapped)
        with self._lock:
            self._open[ident] = (dek, now)
            while len(self._open) > self._capacity:
                self._open.popitem(last=False)
        return dek

    def clear(self) -> None:
        with self._lock:
            self._seal.clear()
            self._open.clear()
