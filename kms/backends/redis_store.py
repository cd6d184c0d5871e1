"""Redis (``KMS_REDIS_URL``): state shared by every worker of every node.

Keys (all under ``kms:``):

- ``kms:sigv4-nonce:<signature>``: a SigV4 signature seen, ``SET NX EX`` until the
  request's own time plus the accepted skew (at most ~10 minutes). ``kms:nonce-epoch``:
  when this Redis data set began to record nonces. A Redis that comes back empty (or is
  new) cannot know which signatures it forgot, so for NONCE_WARM_UP seconds after the
  epoch every signed request is refused (503): fail closed. Run Redis with persistence so
  that a restart keeps its data, and ``maxmemory-policy noeviction`` (an evicted nonce is
  a replay let through); on a first deployment ``SET kms:nonce-epoch 0`` skips the wait.
- ``kms:rate:...``: moving windows of the rate limiter (kms/backends/rate_limits.py).
- ``kms:lease:<name>``: a lease (the scheduler pass), ``SET NX EX``, released by a
  compare-and-delete so that only its holder can free it.
- ``kms:invalidations``: a stream of (kind, id) cache invalidations, each kept for
  ``STREAM_KEEP_SECONDS`` (longer than any cache time, so a worker that looked less than
  half of that ago has missed nothing; one that did not drops everything); ``kms:epoch``:
  a random value set once per Redis data set, so a worker sees that Redis restarted
  empty (and that announcements may be lost).

Each process has one client (redis-py's pool opens new connections after a fork and after
Redis restarts), with ``KMS_REDIS_TIMEOUT_MS`` for connecting and for each reply and one
immediate retry (a pooled connection found dead is replaced once). A failed call makes
every use fail at once for ``RETRY_SECONDS`` (no timeout is waited for again meanwhile);
then the next call tries Redis again, so recovery needs no restart. Every call that could
not use Redis is counted in ``kms_redis_errors_total`` (by use); an outage is logged once
when it starts and once when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kms import metrics
from kms.errors import StorageUnavailable
from kms.services.ports import InvalidationBus, Leases, NonceStore, RateLimiter

log = logging.getLogger("kms.redis")
T = TypeVar("T")

RETRY_SECONDS = 1.0
STREAM = "kms:invalidations"
EPOCH = "kms:epoch"
STREAM_KEEP_SECONDS = 3600
POLL_BATCH = 1_000
NONCE_EPOCH = "kms:nonce-epoch"
NONCE_WARM_UP = 301  # kms.services.sigv4: MAX_SKEW + 1 s, how long a nonce is kept
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"
# KEYS: nonce, epoch; ARGV: seconds to keep, now (unix seconds), warm-up seconds.
# 1: recorded; 0: already recorded (a replay); -1: the store is too young to tell.
_REMEMBER = """
redis.call('set', KEYS[2], ARGV[2], 'NX')
if tonumber(ARGV[2]) < tonumber(redis.call('get', KEYS[2])) + tonumber(ARGV[3]) then
  return -1
end
if redis.call('set', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 1 end
return 0
"""


class RedisUnavailable(StorageUnavailable):
    """Redis could not be used; what was asked was not done."""

    public_message = "a shared store (Redis) is unavailable; nothing was done"


class RedisConnection:
    """The process's Redis client and its outage state (see the module docstring)."""

    def __init__(self, url: str, timeout_ms: int) -> None:
        self.url = url
        seconds = timeout_ms / 1000
        self.client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=seconds,
            socket_connect_timeout=seconds,
            retry=Retry(NoBackoff(), 1),
        )
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()

    def run(self, use: str, call: Callable[[redis.Redis], T]) -> T:
        """``call(client)``; RedisUnavailable if Redis failed now or less than
        RETRY_SECONDS ago (``use`` names the caller in logs and metrics)."""
        if time.monotonic() < self._down_until:
            metrics.redis_error(use)
            raise RedisUnavailable(detail=f"redis {use}: unavailable, retrying shortly")
        try:
            result = call(self.client)
        except redis.RedisError as e:
            metrics.redis_error(use)
            with self._lock:
                self._down_until = time.monotonic() + RETRY_SECONDS
                first, self._down = not self._down, True
            if first:
                log.warning("redis unavailable", extra={"op": use, "error": type(e).__name__})
            raise RedisUnavailable(detail=f"redis {use}: {type(e).__name__}") from e
        if self._down:
            with self._lock:
                was, self._down = self._down, False
            if was:
                log.warning("redis available again", extra={"op": use})
        return result


class RedisNonces:
    """NonceStore: one ``SET NX EX`` per signature, shared by all nodes."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        self._script = conn.client.register_script(_REMEMBER)  # EVALSHA, reloaded if lost

    def remember(self, nonce: str, now: datetime, until: datetime) -> bool:
        """True the first time ``nonce`` is seen before ``until``; RedisUnavailable (503)
        if Redis cannot tell (unreachable, or within NONCE_WARM_UP of starting empty)."""
        seconds = max(1, math.ceil((until - now).total_seconds()))
        keys = [f"kms:sigv4-nonce:{nonce}", NONCE_EPOCH]
        args = [seconds, int(now.timestamp()), NONCE_WARM_UP]
        found = int(self._conn.run("nonce", lambda _: self._script(keys=keys, args=args)))
        if found == -1:
            raise RedisUnavailable(detail="redis nonce: the replay store is warming up")
        return found == 1


class RedisLeases:
    """Leases: ``SET NX EX`` to take, compare-and-delete to give back."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    @contextmanager
    def hold(self, name: str, seconds: int) -> Iterator[bool]:
        """True if this process took the lease (until the block ends or ``seconds``
        pass); False if another holds it; True if Redis cannot be reached."""
        key, token = f"kms:lease:{name}", uuid.uuid4().hex
        try:
            held = bool(self._conn.run("lease", lambda r: r.set(key, token, nx=True, ex=seconds)))
        except RedisUnavailable:
            yield True
            return
        try:
            yield held
        finally:
            if held:
                with contextlib.suppress(RedisUnavailable):  # else it expires by itself
                    self._conn.run("lease", lambda r: r.eval(_RELEASE, 1, key, token))


class RedisBus:
    """InvalidationBus over the ``kms:invalidations`` stream (see the module docstring)."""

    def __init__(self, conn: RedisConnection, keep_seconds: float = STREAM_KEEP_SECONDS) -> None:
        self._conn = conn
        self._keep = keep_seconds
        self._last: bytes | None = None  # the newest stream id this process has read
        self._epoch: bytes | None = None
        self._polled_at = 0.0

    def publish(self, kind: str, ident: str) -> None:
        fields: dict[Any, Any] = {"kind": kind, "id": ident}
        oldest_kept = str(int((time.time() - self._keep) * 1000))
        self._conn.run(
            "invalidation",
            lambda r: r.xadd(STREAM, fields, minid=oldest_kept, approximate=True),
        )

    def poll(self) -> list[tuple[str, str]] | None:
        """Announcements since the previous poll; [] on the first poll; None if some may
        be lost: Redis lost its data, the previous poll is older than half the time
        announcements are kept, or more than POLL_BATCH arrived."""

        def read(r: redis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.set(EPOCH, uuid.uuid4().hex, nx=True)
            pipe.get(EPOCH)
            pipe.xrevrange(STREAM, count=1)
            if self._last is not None:
                pipe.xread({STREAM: self._last}, count=POLL_BATCH)
            return list(pipe.execute())

        replies = self._conn.run("invalidation", read)
        epoch, newest = replies[1], replies[2]
        first = self._last is None
        restarted = self._epoch is not None and epoch != self._epoch
        stale = time.monotonic() - self._polled_at > self._keep / 2
        self._epoch, self._polled_at = epoch, time.monotonic()
        entries = replies[3][0][1] if not first and replies[3] else []
        if first or restarted or stale or len(entries) >= POLL_BATCH:
            self._last = newest[0][0] if newest else b"0-0"
            return [] if first else None
        if entries:
            self._last = entries[-1][0]
        return [(f[b"kind"].decode(), f[b"id"].decode()) for _, f in entries]


@dataclass(frozen=True)
class SharedBackends:
    """What build_services wires in: Redis-backed when a URL is configured; otherwise a
    per-process limiter and None (the database nonce table, no lease, local caches)."""

    limiter: RateLimiter
    nonces: NonceStore | None = None
    leases: Leases | None = None
    bus: InvalidationBus | None = None


def shared_backends(url: str | None, timeout_ms: int) -> SharedBackends:
    """The shared-state backends for ``url`` (None: no Redis). Does not contact Redis:
    the first use does, so the server starts (and recovers) whatever Redis is doing."""
    from kms.backends.rate_limits import MemoryRateLimiter, RedisRateLimiter

    if not url:
        return SharedBackends(MemoryRateLimiter())
    conn = RedisConnection(url, timeout_ms)
    return SharedBackends(
        RedisRateLimiter(conn), RedisNonces(conn), RedisLeases(conn), RedisBus(conn)
    )
