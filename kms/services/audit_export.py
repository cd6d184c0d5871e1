"""Audit bundles (export, archive) and compliance reports.

An export is a self-contained bundle (kms/formats/bundle.py) that the offline verifier
checks with nothing but the public key. Archiving exports a segment that ends at a signed
checkpoint, verifies what was written, and only then removes the segment from the live
database in one transaction with its own audit record; the remaining chain still verifies
from that checkpoint (``kms audit verify --since-checkpoint``).
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from kms.errors import Conflict, InvalidRequest
from kms.formats import bundle
from kms.services.audit import AppendTx, AuditTrail
from kms.services.audit_events import Caller, format_time
from kms.services.audit_verify import verify_bundle
from kms.services.model import JUSTIFICATIONS, Role
from kms.services.ports import Store

PAGE = 1000
UNWRAP_OPERATIONS = ("decrypt", "rewrap")
CRYPTO_OPERATIONS = ("datakey", "encrypt", "decrypt", "rewrap")


def parse_time(text: str, name: str) -> str:
    """An ISO 8601 date or time as a record time string (UTC, milliseconds)."""
    try:
        when = datetime.fromisoformat(text)
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{name} must be an ISO 8601 date or time") from None
    return format_time(when)


@dataclass(frozen=True)
class ArchiveResult:
    through: int
    records: int
    sha256: str


class AuditExports:
    """Reads and archives the audit rows only."""

    def __init__(self, storage: Store[AppendTx], trail: AuditTrail) -> None:
        self._storage = storage
        self._trail = trail

    def export(self, caller: Caller, after: int | None, until: int | None) -> Iterator[str]:
        """Bundle lines for records ``after < seq <= until`` (defaults: the archived prefix
        and the current head). Checks the range now; streams the lines lazily."""
        with self._trail.operation(caller, "export_audit"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            after, until, head = self._range(after, until)
        return self._lines(after, until, head)

    def _range(self, after: int | None, until: int | None) -> tuple[int, int, int]:
        with self._storage.reader() as tx:
            head = tx.audit_head()
        after = head.archived_seq if after is None else after
        until = head.seq if until is None else until
        if after < head.archived_seq:
            raise Conflict(f"records up to seq {head.archived_seq} are archived; export from there")
        if not after <= until <= head.seq:
            raise InvalidRequest(f"need after <= until <= {head.seq} (the current head)")
        return after, until, head.seq

    def _lines(self, after: int, until: int, head: int) -> Iterator[str]:
        pem = self._trail.public_key_pem().decode()
        yield bundle.line(bundle.header(after, until, head, pem))
        cursor = after
        while cursor < until:
            with self._storage.reader() as tx:
                page = tx.audit_records(cursor, PAGE, until=until)
            if not page:
                break
            for record in page:
                yield bundle.line({"type": "record", **record})
            cursor = page[-1]["seq"]
        cursor = after
        while True:
            with self._storage.reader() as tx:
                cps = tx.checkpoints(cursor, until, PAGE)
            if not cps:
                break
            for cp in cps:
                yield bundle.line({"type": "checkpoint", **cp})
            cursor = cps[-1]["seq"]

    def report(self, caller: Caller, since: str, until: str) -> dict[str, Any]:
        """Per key and per principal, for records with since <= time < until: operations
        by type, failures, unwraps by justification and escrow unwraps."""
        with self._trail.operation(caller, "audit_report"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            if since >= until:
                raise InvalidRequest("since must be before until")
            with self._storage.reader() as tx:
                rows = tx.audit_counts(since, until)
        per: dict[str, dict[str, dict[str, Any]]] = {"keys": {}, "principals": {}}
        for row in rows:
            for scope, name in (("keys", row["key_id"]), ("principals", row["principal"])):
                if name is None:
                    continue
                entry = per[scope].setdefault(name, _empty_entry())
                _count(entry, row)
        return {
            "since": since,
            "until": until,
            "keys": [{"key_id": k, **v} for k, v in sorted(per["keys"].items())],
            "principals": [{"principal": k, **v} for k, v in sorted(per["principals"].items())],
        }

    def archive(self, through: int, out: IO[str], reopen: Callable[[], IO[Any]]) -> ArchiveResult:
        """Write records up to checkpoint ``through`` to ``out``, verify what ``reopen()``
        reads back, then delete them from the live database (local operator command)."""
        caller = Caller(request_id="kms-cli", principal=None)
        with self._trail.operation(caller, "archive_audit") as op:
            with self._storage.reader() as tx:
                head = tx.audit_head()
                anchor = tx.checkpoints(head.archived_seq - 1, head.archived_seq, 1)
                target = tx.checkpoints(through - 1, through, 1)
            if not target or through <= head.archived_seq:
                raise InvalidRequest(
                    f"through must be the seq of a checkpoint after {head.archived_seq}"
                )
            digest = hashlib.sha256()
            for text in self._lines(head.archived_seq, through, head.seq):
                out.write(text)
                digest.update(text.encode())
            out.flush()
            with reopen() as written:
                report = verify_bundle(
                    written, self._trail.public_key_pem(), anchor[0] if anchor else None
                )
            if not report.ok or report.last_signed_seq != through:
                raise Conflict(
                    "the archive did not verify; nothing was deleted: " + "; ".join(report.errors)
                )
            op.note(detail=f"through={through} sha256={digest.hexdigest()}")
            with self._storage.transaction() as tx:
                self._trail.append(tx, [op.ok()])  # checks the anchor before anything moves
                tx.archive_audit_through(through)
                self._trail.anchor_archived(tx, through)
        return ArchiveResult(through, report.records, digest.hexdigest())


def _empty_entry() -> dict[str, Any]:
    return {
        "operations": {},
        "failures": 0,
        "unwraps_by_justification": dict.fromkeys(sorted(JUSTIFICATIONS), 0),
        "escrow_unwraps": 0,
    }


def _count(entry: dict[str, Any], row: dict[str, Any]) -> None:
    n = int(row["count"])
    ops = entry["operations"]
    ops[row["operation"]] = ops.get(row["operation"], 0) + n
    if row["outcome"] != "ok":
        entry["failures"] += n
    elif row["operation"] in UNWRAP_OPERATIONS:
        if row["justification"] in entry["unwraps_by_justification"]:
            entry["unwraps_by_justification"][row["justification"]] += n
        if row["escrow"]:
            entry["escrow_unwraps"] += n


def report_csv(report: dict[str, Any]) -> str:
    """The report as CSV: one row per key and per principal, one column per figure."""
    justifications = sorted(JUSTIFICATIONS)
    header = [
        "scope",
        "name",
        "total",
        "failures",
        *CRYPTO_OPERATIONS,
        "other_operations",
        *(f"unwraps_{j}" for j in justifications),
        "escrow_unwraps",
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for scope, name_field in (("key", "key_id"), ("principal", "principal")):
        for entry in report[scope + "s"]:
            ops: dict[str, int] = defaultdict(int, entry["operations"])
            other = sum(v for k, v in ops.items() if k not in CRYPTO_OPERATIONS)
            writer.writerow(
                [
                    scope,
                    entry[name_field],
                    sum(ops.values()),
                    entry["failures"],
                    *(ops[o] for o in CRYPTO_OPERATIONS),
                    other,
                    *(entry["unwraps_by_justification"][j] for j in justifications),
                    entry["escrow_unwraps"],
                ]
            )
    return buf.getvalue()
