"""Per-principal rate limits: which rate applies to whom (the policy) and the 429 error.

``KMS_RATE_LIMITS`` is a comma-separated list of ``WHO=AMOUNT/UNIT`` where WHO is a role
(``service``, ``admin``, ``auditor``, ``custodian``, ``requester``) or ``principal:NAME``
and UNIT is ``second``, ``minute`` or ``hour``; ``WHO=none`` lifts the limit. A principal's
own entry wins over its role's; every entry given replaces the default of that role or
principal only. Counting (a moving window, atomic in Redis) is the RateLimiter port's job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kms.errors import RateLimited
from kms.services.model import Principal, Role

UNITS = {"second": 1, "minute": 60, "hour": 3600}
DEFAULT_RATE_LIMITS = (
    "service=20000/second,admin=1000/second,auditor=1000/second,"
    "custodian=100/second,requester=100/second"
)
# KMS_AUDIT_BUDGET: chained audit records per principal (kms/services/audit_budget.py)
DEFAULT_AUDIT_BUDGET = (
    "service=1000000/hour,admin=100000/hour,auditor=100000/hour,"
    "custodian=10000/hour,requester=10000/hour"
)
# KMS_BLIND_REWRAP_FAILURES: failed rewraps per principal of blobs it may not decrypt
# (kms/services/crypto.py, kms/services/cluster.py); only services rewrap
DEFAULT_BLIND_REWRAP_FAILURES = "service=100/hour"
_ENTRY = re.compile(r"(?:(?P<role>[a-z]+)|principal:(?P<name>[A-Za-z0-9][A-Za-z0-9._@-]{0,63}))")
_RATE = re.compile(r"(?P<amount>[1-9][0-9]{0,8})/(?P<unit>second|minute|hour)")


@dataclass(frozen=True)
class Rate:
    """At most ``amount`` requests in any window of ``seconds``."""

    amount: int
    seconds: int

    def __str__(self) -> str:
        unit = {v: k for k, v in UNITS.items()}[self.seconds]
        return f"{self.amount}/{unit}"


@dataclass(frozen=True)
class RatePolicy:
    """The rate of each role and the per-principal exceptions (None: unlimited)."""

    by_role: Mapping[Role, Rate | None] = field(default_factory=dict)
    by_principal: Mapping[str, Rate | None] = field(default_factory=dict)

    def rate_for(self, principal: Principal) -> Rate | None:
        """The principal's own rate if one is configured, else its role's."""
        if principal.name in self.by_principal:
            return self.by_principal[principal.name]
        return self.by_role.get(principal.role)


def parse_rate_limits(text: str, base: str = DEFAULT_RATE_LIMITS) -> RatePolicy:
    """The policy ``text`` describes on top of ``base``; ValueError naming the first bad
    entry (an unknown role, a malformed rate, a duplicate)."""
    roles: dict[Role, Rate | None] = {}
    names: dict[str, Rate | None] = {}
    for source in (base, text):
        seen: set[str] = set()
        for raw in source.split(","):
            entry = raw.strip()
            if not entry:
                continue
            who, sep, value = (part.strip() for part in entry.partition("="))
            match = _ENTRY.fullmatch(who)
            if not sep or match is None:
                raise ValueError(f"{entry!r}: expected ROLE=N/UNIT or principal:NAME=N/UNIT")
            if who in seen:
                raise ValueError(f"{who!r} is given twice")
            seen.add(who)
            rate = _rate(entry, value)
            if match["name"]:
                names[match["name"]] = rate
                continue
            try:
                roles[Role(match["role"])] = rate
            except ValueError:
                raise ValueError(
                    f"{entry!r}: unknown role; roles are " + ", ".join(r.value for r in Role)
                ) from None
    return RatePolicy(roles, names)


def parse_audit_budget(text: str) -> RatePolicy:
    """The audit budget ``text`` describes over DEFAULT_AUDIT_BUDGET (same syntax and
    errors as parse_rate_limits; the amount counts audit records, not requests)."""
    return parse_rate_limits(text, base=DEFAULT_AUDIT_BUDGET)


def parse_blind_rewrap_failures(text: str) -> RatePolicy:
    """The budget of failed blind rewraps ``text`` describes over
    DEFAULT_BLIND_REWRAP_FAILURES (same syntax and errors as parse_rate_limits)."""
    return parse_rate_limits(text, base=DEFAULT_BLIND_REWRAP_FAILURES)


def _rate(entry: str, value: str) -> Rate | None:
    if value == "none":
        return None
    match = _RATE.fullmatch(value)
    if match is None:
        raise ValueError(f"{entry!r}: the rate must be N/second, N/minute, N/hour or none")
    return Rate(int(match["amount"]), UNITS[match["unit"]])


class Throttled(RateLimited):
    """429: the principal is over its rate; ``retry_after`` whole seconds until a request
    would be counted again (the Retry-After header)."""

    def __init__(self, rate: Rate, retry_after: int) -> None:
        super().__init__(
            f"too many requests: the limit is {rate}; retry after {retry_after} s",
            detail=f"rate limit {rate}",
        )
        self.retry_after = retry_after


class BlindRewrapsRefused(RateLimited):
    """429: the principal failed too many blind rewraps (rewraps of blobs it may not
    decrypt, each a test of a guessed context) in the window of its
    KMS_BLIND_REWRAP_FAILURES; every blind rewrap of it is refused, before any blob is
    opened, until the window lets one more failure in."""

    code = "blind_rewraps_refused"
    public_message = "too many failed rewraps of blobs this principal may not decrypt"

    def __init__(self, rate: Rate, retry_after: int) -> None:
        super().__init__(
            f"{self.public_message}: the limit is {rate}; retry after {retry_after} s",
            detail=f"blind rewrap failures over {rate}",
        )
        self.retry_after = retry_after
