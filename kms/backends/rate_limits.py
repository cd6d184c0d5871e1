"""The RateLimiter port on the ``limits`` library (the core of Flask-Limiter): a moving
window, counted by an atomic Lua script in Redis when Redis is configured, else in
this process.

When Redis cannot be used the limiter counts in this process instead (each worker then
enforces the full limit on its own, so a principal gets at most workers x nodes x limit),
and tries Redis again after kms.backends.redis_store.RETRY_SECONDS. Requests are never let
through unlimited, and a Redis outage does not refuse requests that the limit allows.
"""

from __future__ import annotations

import time

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import MovingWindowRateLimiter

from kms.backends.redis_store import RedisConnection, RedisUnavailable


class MemoryRateLimiter:
    """Counts in this process only."""

    def __init__(self) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, bucket: str, amount: int, seconds: int) -> float:
        """0.0 and one request counted if fewer than ``amount`` were counted in the last
        ``seconds``; otherwise the seconds until one will be."""
        return _hit(self._limiter, bucket, amount, seconds)


class RedisRateLimiter:
    """Counts in Redis, shared by every worker and node; per process while Redis fails."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        storage = RedisStorage(
            conn.url, connection_pool=conn.client.connection_pool, key_prefix="kms:rate"
        )
        self._limiter = MovingWindowRateLimiter(storage)
        self._fallback = MemoryRateLimiter()

    def hit(self, bucket: str, amount: int, seconds: int) -> float:
        """As MemoryRateLimiter.hit, counted atomically in Redis; in this process (never
        raising) while Redis is unavailable."""
        try:
            return self._conn.run(
                "rate_limit", lambda _: _hit(self._limiter, bucket, amount, seconds)
            )
        except RedisUnavailable:
            return self._fallback.hit(bucket, amount, seconds)


def _hit(limiter: MovingWindowRateLimiter, bucket: str, amount: int, seconds: int) -> float:
    item = RateLimitItemPerSecond(amount, seconds)
    if limiter.hit(item, bucket):
        return 0.0
    reset, _ = limiter.get_window_stats(item, bucket)
    return min(float(seconds), max(0.0, reset - time.time()))
