"""Bounded audit growth: each principal's budget of chained audit records
(``KMS_AUDIT_BUDGET``), the coalesced record of the refusals over it, and the monitor of
the chain's growth (``KMS_AUDIT_ALERT_RECORDS_PER_MINUTE``).

The budget has the syntax of ``KMS_RATE_LIMITS`` and its own defaults,
DEFAULT_AUDIT_BUDGET (both in kms/services/rate_limits.py). A request is charged before
any work: one record when it is admitted (kms/services/cluster.py, right after
authentication, on every face), and one per further item of a batch when the key-use
runner has counted them (kms/services/key_work.py), before it reads a row or calls the
HSM. The count is a
sliding-window counter shared by every worker and node through Redis when Redis is
configured (per worker otherwise, or while Redis is down).

Over the budget the request is refused with AuditBudgetExceeded (429) and chains no record
of its own. Instead, at most one record per principal per COALESCE_SECONDS (counted in the
same store, so cluster-wide with Redis) says so::

    principal  the principal
    operation  the refused request's operation (``audit_budget`` when written by flush())
    outcome    audit_budget_exceeded
    request_id the refused request's id (``audit-budget-<hex>`` when written by flush())
    detail     "over the audit budget of 1000/minute: N requests (M items) refused by
               this worker since TIME, this one included"

Every refusal over the budget is counted in exactly one such record: a worker keeps the
refusals it did not chain and writes them in its next record for that principal, or in
flush() (every few seconds in each worker) once the principal's window lets it. Refusals
a worker held when it died are in kms_audit_budget_refused_total only. A Throttled refusal
(over the rate limit) is charged to the budget like any request, so it is chained while
the budget allows and coalesced beyond it.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections import deque
from dataclasses import dataclass

from kms.errors import AuditBudgetExceeded, ServerError
from kms.metrics import (
    AUDIT_BUDGET_REFUSED,
    AUDIT_CHAIN_RECORDS,
    AUDIT_GROWTH_ALERT,
    AUDIT_RECORDS_LAST_MINUTE,
    AUDIT_UNSIGNED,
)
from kms.services.audit import AuditTrail
from kms.services.audit_events import format_time
from kms.services.model import AuditEvent, Principal
from kms.services.ports import AuditRows, Clock, RateLimiter, Store
from kms.services.rate_limits import Rate, RatePolicy

log = logging.getLogger("kms.audit")

COALESCE_SECONDS = 60
FLUSH_SECONDS = 10
DEFAULT_ALERT_RECORDS_PER_MINUTE = 60000
OUTCOME = AuditBudgetExceeded.code


@dataclass
class _Held:
    """Refusals of one principal this worker has not chained yet."""

    rate: Rate
    since: str
    requests: int = 0
    items: int = 0


class AuditBudget:
    """Charges principals for the records their requests will chain (see the module doc)."""

    def __init__(
        self,
        limiter: RateLimiter,
        policy: RatePolicy,
        trail: AuditTrail,
        clock: Clock,
        coalesce_seconds: int = COALESCE_SECONDS,
    ) -> None:
        self._limiter = limiter
        self.coalesce_seconds = coalesce_seconds
        self._policy = policy
        self._trail = trail
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()

    def charge(
        self, principal: Principal, request_id: str, operation: str, cost: int, items: int = 1
    ) -> None:
        """Count ``cost`` records against ``principal``'s budget. Over it: count the
        refusal of a request of ``items`` items (coalesced, see the module doc) and raise
        AuditBudgetExceeded (429, with the seconds to wait); nothing else is recorded for
        the request."""
        rate = self._policy.rate_for(principal)
        if rate is None or cost <= 0:
            return
        wait = self._limiter.spend("audit:" + principal.name, rate.amount, rate.seconds, cost)
        if wait <= 0:
            return
        retry = max(1, math.ceil(wait))
        AUDIT_BUDGET_REFUSED.labels(principal.role.value, "requests").inc()
        AUDIT_BUDGET_REFUSED.labels(principal.role.value, "items").inc(items)
        with self._lock:
            held = self._held.setdefault(
                principal.name, _Held(rate, format_time(self._clock.now()))
            )
            held.rate, held.requests, held.items = rate, held.requests + 1, held.items + items
        self._write_if_due(principal.name, request_id, operation)
        error = AuditBudgetExceeded(
            f"too many audited operations: the audit budget is {rate}; retry after {retry} s",
            detail=f"audit budget {rate}",
        )
        error.retry_after = retry
        raise error

    def flush(self) -> None:
        """Chain the refusals this worker holds, one record per principal whose window
        allows one now (the rest wait). Never raises."""
        with self._lock:
            names = list(self._held)
        for name in names:
            self._write_if_due(name, f"audit-budget-{uuid.uuid4().hex}", "audit_budget")

    def _write_if_due(self, name: str, request_id: str, operation: str) -> None:
        with self._lock:
            if name not in self._held:
                return
        if self._limiter.hit("audit-refused:" + name, 1, self.coalesce_seconds) > 0:
            return  # a record for this principal was written in the last window
        with self._lock:
            held = self._held.pop(name, None)
        if held is None:
            return
        detail = (
            f"over the audit budget of {held.rate}: {held.requests} requests "
            f"({held.items} items) refused by this worker since {held.since}"
        )
        event = AuditEvent(request_id, name, operation, outcome=OUTCOME, detail=detail)
        try:
            self._trail.record([event])
        except ServerError:  # the database or the audit anchor refused
            with self._lock:  # keep them for the next record
                again = self._held.setdefault(name, held)
                if again is not held:
                    again.requests += held.requests
                    again.items += held.items
                    again.since = held.since
            log.error("could not record refusals over the audit budget", extra={"op": operation})
            return
        log.warning(
            "refused over the audit budget",
            extra={"principal": name, "op": operation, "detail": detail},
        )


class AuditGrowth:
    """Watches the chain's length: how many records were appended in the last minute
    (by every worker and node: read from the chain head), against an alert threshold."""

    def __init__(self, storage: Store[AuditRows], clock: Clock, alert_per_minute: int) -> None:
        self._storage = storage
        self._clock = clock
        self.alert_per_minute = alert_per_minute
        self._samples: deque[tuple[float, int]] = deque()
        self._alerting = False
        self._lock = threading.Lock()

    def sample(self) -> int:
        """Read the chain's length now; set the growth gauges; return the records
        appended since the oldest sample of the last minute (a lower bound of the last
        minute's growth). Past the threshold the alert gauge reads 1 and an error line is
        logged (once each time the growth goes over). Raises StorageUnavailable."""
        with self._storage.reader() as tx:
            head = tx.audit_head()
        seq = head.seq
        now = self._clock.now().timestamp()
        with self._lock:
            self._samples.append((now, seq))
            while len(self._samples) > 1 and self._samples[0][0] < now - 60:
                self._samples.popleft()
            grown = max(0, seq - self._samples[0][1])
            over = bool(self.alert_per_minute) and grown > self.alert_per_minute
            started, self._alerting = over and not self._alerting, over
        AUDIT_CHAIN_RECORDS.set(seq)
        AUDIT_UNSIGNED.set(seq - head.checkpoint_seq)
        AUDIT_RECORDS_LAST_MINUTE.set(grown)
        AUDIT_GROWTH_ALERT.set(1 if over else 0)
        if started:
            log.error(
                "audit trail growing faster than the alert threshold",
                extra={
                    "detail": f"{grown} records in the last minute, threshold "
                    f"{self.alert_per_minute} (KMS_AUDIT_ALERT_RECORDS_PER_MINUTE)"
                },
            )
        return grown

    def sample_quietly(self) -> None:
        """sample(), logging instead of raising (timers, scrapes)."""
        try:
            self.sample()
        except ServerError:
            log.warning("could not read the audit chain's length")
