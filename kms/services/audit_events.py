"""Who asks and what is recorded of one operation: the caller as the face established
it, and the fields of its audit record collected while it runs (kms/services/audit.py
chains them)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from kms.errors import Forbidden
from kms.services.model import AuditEvent, Principal, Role
from kms.services.ports import NonceRows


class Claim(Protocol):
    """Something the request's authentication still has to record, in the transaction
    that commits the request's audit records (see kms/services/sigv4.py, DeferredNonce)."""

    def claim(self, tx: NonceRows) -> None:
        """Record it; raise Unauthenticated (nothing is then committed) if it cannot be."""
        ...


@dataclass(frozen=True)
class Caller:
    """Who is asking, as established by the adapter that received the request; ``claim``
    is what its authentication left to record at commit (a SigV4 signature's nonce);
    ``change`` the approved dual-control change it applies (kms/services/changes.py)."""

    request_id: str
    principal: Principal | None
    claim: Claim | None = None
    change: str | None = None

    @property
    def name(self) -> str | None:
        return self.principal.name if self.principal else None

    def require(self, *roles: Role) -> Principal:
        """The principal, if it holds one of ``roles``; Forbidden otherwise."""
        if self.principal is None or self.principal.role not in roles:
            raise Forbidden("this operation needs the role " + " or ".join(r.value for r in roles))
        return self.principal


def format_time(when: datetime) -> str:
    """``when`` (UTC) as "YYYY-MM-DDTHH:MM:SS.mmmZ", the milliseconds truncated: the
    time field of audit records, ordered as text. Years 1000 to 9999."""
    return when.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


class EventBuilder:
    """Collects the fields of one audit record while its operation runs."""

    def __init__(self, caller: Caller, name: str) -> None:
        self._fields: dict[str, Any] = {
            "request_id": caller.request_id,
            "principal": caller.name,
            "operation": name,
        }
        self._describe: Callable[[str | None], str] | None = None
        self.written = False  # the request's records are committed (set by the writer)
        self.failure: tuple[list[EventBuilder], int] | None = None  # see fail_as()

    @property
    def event(self) -> AuditEvent:
        return AuditEvent(**self._fields)

    def note(self, **fields: Any) -> None:
        self._fields.update(fields)

    def describe_failures(self, describe: Callable[[str | None], str]) -> None:
        """Write a failure's detail as ``describe(reason)`` (the XKS face's metadata)."""
        self._describe = describe

    def ok(self, **fields: Any) -> AuditEvent:
        return AuditEvent(**{**self._fields, **fields, "outcome": "ok"})

    def failed(self, code: str, detail: str | None) -> AuditEvent:
        if self._describe is not None:
            detail = self._describe(detail)
        return AuditEvent(**{**self._fields, "outcome": code, "detail": detail})

    def fail_as(self, ops: list[EventBuilder], unreached: int) -> None:
        """If the operation fails, record the events of ``ops`` and ``unreached`` more
        (the items of a batch it never reached) instead of this one event."""
        self.failure = (ops, unreached)


def local_event(operation: str, detail: str | None, outcome: str = "ok") -> AuditEvent:
    """The record of something no principal asked for: an operator command run on the
    server host, an integrity alarm."""
    return AuditEvent(
        request_id="local-" + secrets.token_hex(8),
        principal=None,
        operation=operation,
        outcome=outcome,
        detail=detail,
    )
