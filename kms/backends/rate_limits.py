"""The RateLimiter port on the ``limits`` library (the core of Flask-Limiter): a moving
window (rate limits) or a sliding-window counter (audit budgets), counted by atomic Lua
scripts in Redis when Redis is configured, else in this process.

When Redis cannot be used the limiter counts in this process instead (each worker then
enforces the full limit on its own, so a principal gets at most workers x nodes x limit),
and tries Redis again after kms.backends.redis_store.RETRY_SECONDS. Requests are never let
through unlimited, and a Redis outage does not refuse requests that the limit allows.
"""

from __future__ import annotations

import time

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import (
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

from kms.backends.redis_store import RedisConnection, RedisUnavailable


class MemoryRateLimiter:
    """Counts in this process only."""

    def __init__(self) -> None:
        storage = MemoryStorage()
        self._moving = MovingWindowRateLimiter(storage)
        self._counter = SlidingWindowCounterRateLimiter(storage)

    def hit(self, bucket: str, amount: int, seconds: int, cost: int = 1) -> float:
        """0.0 and ``cost`` requests counted if at most ``amount`` are then counted in the
        last ``seconds``; otherwise the seconds until one will be."""
        return _hit(self._moving, bucket, amount, seconds, cost)

    def spend(self, bucket: str, amount: int, seconds: int, cost: int) -> float:
        """As hit(), on a sliding-window counter."""
        return _hit(self._counter, "budget/" + bucket, amount, seconds, cost)

    def wait(self, bucket: str, amount: int, seconds: int) -> float:
        """The seconds until hit() would count one more in ``bucket``; counts nothing."""
        return _wait(self._moving, bucket, amount, seconds)


class RedisRateLimiter:
    """Counts in Redis, shared by every worker and node; per process while Redis fails."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        storage = RedisStorage(
            conn.url, connection_pool=conn.client.connection_pool, key_prefix="kms:rate"
        )
        self._moving = MovingWindowRateLimiter(storage)
        self._counter = SlidingWindowCounterRateLimiter(storage)
        self._fallback = MemoryRateLimiter()

    def hit(self, bucket: str, amount: int, seconds: int, cost: int = 1) -> float:
        """As MemoryRateLimiter.hit, counted atomically in Redis; in this process (never
        raising) while Redis is unavailable."""
        try:
            return self._conn.run(
                "rate_limit", lambda _: _hit(self._moving, bucket, amount, seconds, cost)
            )
        except RedisUnavailable:
            return self._fallback.hit(bucket, amount, seconds, cost)

    def spend(self, bucket: str, amount: int, seconds: int, cost: int) -> float:
        """As MemoryRateLimiter.spend, counted atomically in Redis (per process while it
        is unavailable)."""
        try:
            return self._conn.run(
                "rate_limit",
                lambda _: _hit(self._counter, "budget/" + bucket, amount, seconds, cost),
            )
        except RedisUnavailable:
            return self._fallback.spend(bucket, amount, seconds, cost)

    def wait(self, bucket: str, amount: int, seconds: int) -> float:
        """As MemoryRateLimiter.wait, read in Redis (in this process while it is
        unavailable, where hit() counts then)."""
        try:
            return self._conn.run(
                "rate_limit", lambda _: _wait(self._moving, bucket, amount, seconds)
            )
        except RedisUnavailable:
            return self._fallback.wait(bucket, amount, seconds)


def _hit(limiter: RateLimiter, bucket: str, amount: int, seconds: int, cost: int) -> float:
    item = RateLimitItemPerSecond(amount, seconds)
    if limiter.hit(item, bucket, cost=cost):
        return 0.0
    return _reset(limiter, item, bucket, seconds)


def _wait(limiter: RateLimiter, bucket: str, amount: int, seconds: int) -> float:
    item = RateLimitItemPerSecond(amount, seconds)
    if limiter.test(item, bucket):
        return 0.0
    return max(_reset(limiter, item, bucket, seconds), 0.001)


def _reset(limiter: RateLimiter, item: RateLimitItemPerSecond, bucket: str, seconds: int) -> float:
    reset, _ = limiter.get_window_stats(item, bucket)
    return min(float(seconds), max(0.0, reset - time.time()))
