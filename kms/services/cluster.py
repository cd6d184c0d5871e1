"""What a worker shares with the other workers and nodes: per-principal rate limits, cache
invalidations and the scheduler lease (through Redis when ``KMS_REDIS_URL`` is set).

How stale can a worker be? Key state, grants and minimum versions are read from the
database for every request and re-checked in the audit transaction, so disabling a key
takes effect on every node at once. What workers do cache:

- bearer-token look-ups (``KMS_AUTH_CACHE_SECONDS``): principals cannot be changed or
  removed, so an entry never goes stale; nothing to invalidate.
- SigV4 credentials (same time limit): a revocation is announced, and a worker uses a
  cached credential only if it read the announcements less than POLL_SECONDS before, so
  with Redis no worker accepts a revoked credential about a second after the revocation.
  Without Redis, or while it is down, the time limit bounds it.
- the HSM's unwrapped KEK objects of a destroyed key: announced, so every worker destroys
  its copies at its next request (hygiene: a destroyed key is refused anyway).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kms.errors import StorageUnavailable
from kms.services.audit_budget import AuditBudget
from kms.services.audit_events import Caller
from kms.services.hsm_port import Hsm
from kms.services.keys import KeyService
from kms.services.model import Principal
from kms.services.ports import InvalidationBus, Leases, RateLimiter
from kms.services.rate_limits import (
    BlindRewrapsRefused,
    RatePolicy,
    Throttled,
    parse_audit_budget,
    parse_blind_rewrap_failures,
    parse_rate_limits,
)
from kms.services.rotation import DueRun

log = logging.getLogger("kms.cluster")

POLL_SECONDS = 1.0
SCHEDULER_LEASE_SECONDS = 900
CREDENTIAL = "credential"  # id: an access key id
KEY = "key"  # id: a destroyed key's id


@dataclass(frozen=True)
class ClusterSettings:
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    redis_timeout_ms: int = 250
    rate_limits: RatePolicy = field(default_factory=lambda: parse_rate_limits(""))
    audit_budget: RatePolicy = field(default_factory=lambda: parse_audit_budget(""))
    blind_rewrap_failures: RatePolicy = field(
        default_factory=lambda: parse_blind_rewrap_failures("")
    )


class Invalidations:
    """Cache invalidations: ``publish`` drops an entry here and announces it; ``refresh``
    applies what other processes announced. Without a bus, only this process's caches."""

    def __init__(self, bus: InvalidationBus | None, interval: float = POLL_SECONDS) -> None:
        self._bus = bus
        self._interval = interval
        self._handlers: dict[str, list[Callable[[str | None], None]]] = {}
        self._next = 0.0
        self._lost = False
        self._lock = threading.Lock()

    def subscribe(self, kind: str, drop: Callable[[str | None], None]) -> None:
        """Call ``drop(id)`` when an entry of ``kind`` changes, ``drop(None)`` when some
        announcements may have been missed (drop everything)."""
        self._handlers.setdefault(kind, []).append(drop)

    def publish(self, kind: str, ident: str) -> None:
        """Drop ``ident`` here now and tell every other process. Never raises: if the bus
        fails the others drop it when their cache time runs out."""
        self._apply(kind, ident)
        if self._bus is None:
            return
        try:
            self._bus.publish(kind, ident)
        except StorageUnavailable:
            log.warning("invalidation not announced; other workers wait for the cache time")

    def refresh(self) -> None:
        """Apply the announcements of others if the last look is POLL_SECONDS old. Never
        raises; after a failed look, everything is dropped at the next successful one."""
        if self._bus is None:
            return
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                return
            self._next = now + self._interval
            try:
                events = self._bus.poll()
            except StorageUnavailable:
                self._lost = True
                return
            if self._lost:
                events, self._lost = None, False
        if events is None:
            for kind in self._handlers:
                self._apply(kind, None)
            return
        for kind, ident in events:
            self._apply(kind, ident)

    def _apply(self, kind: str, ident: str | None) -> None:
        for drop in self._handlers.get(kind, []):
            drop(ident)


class BlindRewrapFailures:
    """Each principal's budget of failed blind rewraps (KMS_BLIND_REWRAP_FAILURES; the
    crypto service's BlindFailures): a moving window shared by every worker and node
    through Redis when configured (per worker otherwise, or while Redis is down). The
    check and the count are two steps, so concurrent requests of one principal can
    overshoot by the number in flight; the items of one request are counted in turn."""

    def __init__(self, limiter: RateLimiter, policy: RatePolicy) -> None:
        self._limiter = limiter
        self._policy = policy

    def check(self, principal: Principal) -> None:
        """BlindRewrapsRefused (429) if one more failure would be over the budget."""
        rate = self._policy.rate_for(principal)
        if rate is None:
            return
        wait = self._limiter.wait(_blind(principal), rate.amount, rate.seconds)
        if wait > 0:
            log.warning(
                "blind rewrap refused: too many failures",
                extra={"principal": principal.name, "detail": f"limit {rate}"},
            )
            raise BlindRewrapsRefused(rate, max(1, math.ceil(wait)))

    def failed(self, principal: Principal) -> None:
        """Count one failure (nothing more is counted once the budget is spent)."""
        rate = self._policy.rate_for(principal)
        if rate is not None:
            self._limiter.hit(_blind(principal), rate.amount, rate.seconds)


def _blind(principal: Principal) -> str:
    return "blind-rewrap-failures:" + principal.name


class Cluster:
    def __init__(
        self,
        limiter: RateLimiter,
        policy: RatePolicy,
        leases: Leases | None,
        invalidations: Invalidations,
        hsm: Hsm,
        budget: AuditBudget | None = None,
    ) -> None:
        self._limiter = limiter
        self._policy = policy
        self.budget = budget
        self._leases = leases
        self.invalidations = invalidations
        invalidations.subscribe(KEY, lambda key_id: hsm.forget(key_id) if key_id else None)

    def admit(
        self,
        principal: Principal,
        request_id: str = "",
        operation: str = "",
        items: int = 1,
        batch: int = 1,
    ) -> None:
        """Count ``items`` (one request, or the further items of a batch of ``batch``) of
        an authenticated ``principal``: first against its audit budget
        (AuditBudgetExceeded, 429, coalesced: kms/services/audit_budget.py), then against
        its rate (Throttled, 429, with the seconds to wait). Applies pending cache
        invalidations."""
        self.invalidations.refresh()
        if self.budget is not None:
            self.budget.charge(principal, request_id, operation, items, batch)
        rate = self._policy.rate_for(principal)
        if rate is None or items <= 0:
            return
        wait = self._limiter.hit(principal.name, rate.amount, rate.seconds, items)
        if wait > 0:
            raise Throttled(rate, max(1, math.ceil(wait)))

    def scheduler_pass(self, keys: KeyService, caller: Caller) -> DueRun | None:
        """One pass of ``keys.run_due`` unless another process is running one (None).
        The lease only saves duplicate HSM work: run_due is exactly-once on its own.
        Destroyed keys are announced so every worker drops its HSM objects of them."""
        if self._leases is None:
            run = keys.run_due(caller)
        else:
            with self._leases.hold("scheduler", SCHEDULER_LEASE_SECONDS) as held:
                if not held:
                    return None
                run = keys.run_due(caller)
        for key_id in run.destroyed:
            self.invalidations.publish(KEY, key_id)
        return run
