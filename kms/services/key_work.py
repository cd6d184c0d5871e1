"""The audited unit of work of every face that touches key material: the native API, the
AWS KMS face, the XKS face and escrow unwraps.

For each request it:

0. charges the further items of a batch (the first was charged when the request was
   admitted) against the principal's audit budget and rate limit (``Admission``), before
   any row is read or the HSM called: over either, the request is refused whole;
1. collects the uses of keys its items make (``KeyWork.use``), deciding each with the one
   rule of kms/services/key_use.py on rows the worker cached (a provisional admission) or
   read in the request's read transaction;
2. lets each item do its HSM work;
3. in one write transaction, records what the caller's authentication left to record (a
   SigV4 nonce, see ``Caller.claim``), decides again with the same rule on rows read there
   (never the cache), spends escrow budgets, and appends one audit record per item;
4. returns the results only once those records committed. If the decision at commit
   refuses what a cached row admitted, the request runs again once from the database, so
   it is answered as if the cache had not existed.

A client error of one item is that item's result (batches answer each item); anything
else aborts the request: every item is recorded as failed and nothing is returned. The
cache only chooses which rows are fed to ``decide``: it never refuses (before a refusal
the rows are read again) and never has the last word (the commit does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from kms.errors import (
    ClientError,
    DecryptionFailed,
    Forbidden,
    InvalidRequest,
    KeyStateError,
    KmsError,
    NotFound,
)
from kms.formats.xks import XksKeyPolicy
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller, EventBuilder
from kms.services.escrow_common import EscrowTx
from kms.services.key_refs import UUID_RE
from kms.services.key_use import CaseStanding, Face, Use, decide, decide_unknown
from kms.services.lookup_cache import LookupCache
from kms.services.model import (
    AuditEvent,
    CaseState,
    Grant,
    KekRef,
    Key,
    Permission,
    Principal,
    Role,
)
from kms.services.ports import GrantRows, NonceRows, PrincipalRows, Store, XksRows

MAX_BATCH = 1000
R = TypeVar("R")
I = TypeVar("I")  # noqa: E741

# Uses that may be admitted from the worker's cache: opening blobs, never sealing (a
# sealing use must see the key's current version) and never under an escrow case.
_PROVISIONAL = frozenset({Permission.DECRYPT, Permission.XKS_DECRYPT})


class KeyUseTx(EscrowTx, GrantRows, XksRows, NonceRows, PrincipalRows, Protocol):
    """The rows a request that uses keys reads and writes: keys and grants, XKS policies,
    escrow cases (and what deciding on them reads), a deferred SigV4 nonce, the caller's
    principal (still enabled?), the audit."""


class Admission(Protocol):
    """The per-principal audit budget and rate limit (kms/services/cluster.py)."""

    def admit(
        self,
        principal: Principal,
        request_id: str = "",
        operation: str = "",
        items: int = 1,
        batch: int = 1,
    ) -> None:
        """Count ``items`` of a request of ``batch`` items; AuditBudgetExceeded or
        Throttled (429) over either limit."""
        ...


class CaseBook(Protocol):
    """The escrow cases' side of a decision (kms/services/escrow.py)."""

    def standing(self, tx: EscrowTx, case_id: str, *, settle: bool = False) -> CaseStanding: ...
    def spend(self, tx: EscrowTx, case_id: str, count: int) -> None: ...


@dataclass(frozen=True)
class Rows:
    """What one decision on a key is made on, for one principal."""

    key: Key
    grant: Grant
    xks_policy: XksKeyPolicy | None = None  # read only for the XKS face
    broken_grant: str | None = None  # KeyAccess.broken_grant


class KeyWork:
    """The key look-ups and decisions of one run of a request. Rows are read in one read
    transaction, opened on the first look-up that needs the database."""

    def __init__(
        self,
        reader: Callable[[], KeyUseTx],
        principal: Principal,
        cache: LookupCache,
        cases: CaseBook | None,
        admissions: bool,
    ) -> None:
        self._reader = reader
        self._tx: KeyUseTx | None = None
        self.principal = principal
        self._cache = cache
        self._cases = cases
        self._admissions = admissions
        self._rows: dict[tuple[str, bool], Rows | None] = {}  # (key id, xks) -> rows read
        self._standings: dict[str, CaseStanding] = {}
        self.provisional: set[tuple[str, bool]] = set()  # rows taken from the cache
        self._item: list[tuple[str, Use]] = []  # uses of the item running now
        self.uses: list[tuple[str, Use]] = []  # uses of the items that succeeded
        self.case_counts: dict[str, int] = {}

    @property
    def tx(self) -> KeyUseTx:
        if self._tx is None:
            self._tx = self._reader()
        return self._tx

    # -- look-ups -----------------------------------------------------------------------

    def key_id(self, ref: str) -> str | None:
        """The key id a caller named by id or alias (aliases never change); None if no key
        has that alias. Nothing is refused here: ``use`` answers a key that does not
        exist as the one rule says (for a principal without a grant, as a key it holds no
        grant on)."""
        if UUID_RE.fullmatch(ref):
            return ref
        ident = ("alias", ref)
        key_id: str | None = self._cache.get(ident)
        if key_id is None:
            key = self.tx.key_by_alias(ref)
            if key is None:
                return None
            key_id = key.key_id
            self._cache.put(ident, key_id)
        return key_id

    def kek(self, key_id: str, version: int) -> KekRef:
        """A KEK version's wrapped material (immutable, so the worker-wide cache serves
        it); DecryptionFailed if the version does not exist."""
        ident = ("kek", key_id, version)
        kek: KekRef | None = self._cache.get(ident)
        if kek is None:
            kv = self.tx.key_version(key_id, version)
            if kv is None:
                raise DecryptionFailed(detail=f"unknown key version {version}")
            kek = kv.ref()
            self._cache.put(ident, kek)
        return kek

    # -- decisions ----------------------------------------------------------------------

    def use(
        self, key_id: str | None, use: Use, missing: Callable[[], KmsError] | None = None
    ) -> Rows:
        """Decide ``use`` of the key and remember it for the decision at commit; raises
        the refusal. A key that does not exist (``key_id`` None: an alias naming none) is
        refused by the one rule as such (``decide_unknown``: for a principal without a
        grant, exactly as an existing key it holds no grant on), the reason given by
        ``missing()`` (NotFound by default) in the audit detail; ``missing()`` itself is
        raised only where the rule lets a use of a missing key through (an escrow case
        whose scope names it)."""
        xks = use.face is Face.XKS
        case = None
        if use.case is not None:
            case_id = use.case.case_id
            earlier = self.case_counts.get(case_id, 0) + sum(
                1 for _, u in self._item if u.case and u.case.case_id == case_id
            )
            use = replace(use, case=replace(use.case, earlier=earlier))
            case = self._standing(case_id)
        if key_id is None:
            raise self._unknown(None, use, case, missing)
        rows = self._admitted(key_id, use) if self._may_admit(use) else None
        if rows is None:
            rows = self._read(key_id, xks)
            if rows is None:
                raise self._unknown(key_id, use, case, missing)
            refusal = self._decide(rows, use, case)
            if refusal is not None:
                raise refusal
            if self._may_admit(use) and (key_id, xks) not in self.provisional:
                self._cache.put(self._ident(key_id, xks), rows)
        self._item.append((key_id, use))
        return rows

    def end_item(self, ok: bool) -> None:
        """Keep the uses of the item that just ended if it succeeded (only they are decided
        again at commit and spend escrow budgets)."""
        if ok:
            self.uses += self._item
            for _, use in self._item:
                if use.case is not None:
                    case_id = use.case.case_id
                    self.case_counts[case_id] = self.case_counts.get(case_id, 0) + 1
        self._item = []

    def commit(self, tx: KeyUseTx) -> None:
        """Inside the audit write transaction: decide every kept use again on rows read
        there (one read per key), after the caller's principal row (a principal disabled
        since it authenticated is refused here, on every face), then spend the escrow
        budgets. Raises the refusal."""
        current = tx.principal_by_name(self.principal.name)
        if current is None or current.id != self.principal.id or current.disabled:
            # authenticated, then disabled: a refusal on the record (a 401 is not recorded)
            raise Forbidden(
                "this principal is disabled",
                detail=f"principal {self.principal.name} is disabled or gone",
            )
        fresh: dict[tuple[str, bool], Rows | None] = {}
        cases: dict[str, CaseStanding] = {}
        decided: set[tuple[str, Use]] = set()
        for key_id, use in self.uses:
            if use.case is None:  # the same use on the same rows: the same decision
                if (key_id, use) in decided:
                    continue
                decided.add((key_id, use))
            xks = use.face is Face.XKS
            if (key_id, xks) not in fresh:
                fresh[(key_id, xks)] = _read_rows(tx, key_id, self.principal, xks)
            rows = fresh[(key_id, xks)]
            if rows is None:
                raise KeyStateError("the key no longer exists", detail="deleted during request")
            case = None
            if use.case is not None:
                assert self._cases is not None
                case_id = use.case.case_id
                if case_id not in cases:
                    cases[case_id] = self._cases.standing(tx, case_id, settle=True)
                case = cases[case_id]
            refusal = self._decide(rows, use, case)
            if refusal is not None:
                raise refusal
        for case_id, count in self.case_counts.items():
            assert self._cases is not None
            self._cases.spend(tx, case_id, count)

    def forget_admissions(self) -> None:
        """Drop the worker's cached rows this run was admitted with (they were stale)."""
        for key_id, xks in self.provisional:
            self._cache.drop(self._ident(key_id, xks))

    def _decide(self, rows: Rows, use: Use, case: CaseStanding | None) -> ClientError | None:
        refusal = decide(
            rows.key,
            rows.grant,
            use,
            xks_policy=rows.xks_policy,
            case=case,
            requester=self.principal.name,
        )
        if refusal is not None and rows.broken_grant is not None:
            # the caller sees the ordinary "no grant"; the audit record, which row failed
            refusal.detail = rows.broken_grant
        return refusal

    def _unknown(
        self,
        key_id: str | None,
        use: Use,
        case: CaseStanding | None,
        missing: Callable[[], KmsError] | None,
    ) -> KmsError:
        absent = missing() if missing else NotFound("no such key")
        reason = absent.detail or ("no key has this alias" if key_id is None else "no such key")
        refusal = decide_unknown(key_id, use, reason, case=case, requester=self.principal.name)
        return absent if refusal is None else refusal

    def _may_admit(self, use: Use) -> bool:
        return self._admissions and use.case is None and use.permission in _PROVISIONAL

    def _admitted(self, key_id: str, use: Use) -> Rows | None:
        """The cached rows, if they admit ``use``; otherwise None (read them)."""
        xks = use.face is Face.XKS
        if (key_id, xks) in self._rows and (key_id, xks) not in self.provisional:
            return None  # read by this run
        rows = self._rows.get((key_id, xks))  # taken from the cache earlier in this run
        if rows is None:
            rows = self._cache.get(self._ident(key_id, xks))
        if rows is None or self._decide(rows, use, None) is not None:
            self.provisional.discard((key_id, xks))
            self._rows.pop((key_id, xks), None)
            return None
        self._rows[(key_id, xks)] = rows
        self.provisional.add((key_id, xks))
        return rows

    def _read(self, key_id: str, xks: bool) -> Rows | None:
        if (key_id, xks) not in self._rows or (key_id, xks) in self.provisional:
            self.provisional.discard((key_id, xks))
            self._rows[(key_id, xks)] = _read_rows(self.tx, key_id, self.principal, xks)
        return self._rows[(key_id, xks)]

    def _standing(self, case_id: str) -> CaseStanding:
        if self._cases is None:
            return CaseStanding(None, CaseState.CLOSED, False, "escrow not configured")
        if case_id not in self._standings:
            self._standings[case_id] = self._cases.standing(self.tx, case_id)
        return self._standings[case_id]

    def _ident(self, key_id: str, xks: bool) -> tuple[str, str, int, bool]:
        return ("rows", key_id, self.principal.id, xks)


def _read_rows(tx: KeyUseTx, key_id: str, principal: Principal, xks: bool) -> Rows | None:
    access = tx.key_access(key_id, principal.id)
    if access is None:
        return None
    policy = tx.xks_policy(key_id) if xks else None
    return Rows(access.key, access.grant, policy, access.broken_grant)


class _StaleAdmission(Exception):
    """The decision at commit refused what the worker's cache had admitted."""


class KeyUseRunner:
    """Runs requests that use keys as one audited unit of work (see the module doc)."""

    def __init__(
        self,
        storage: Store[KeyUseTx],
        audit: AuditTrail,
        cache: LookupCache,
        cases: CaseBook | None,
        admission: Admission | None = None,
    ) -> None:
        self._storage = storage
        self._audit = audit
        self._cache = cache
        self._cases = cases
        self._admission = admission

    def run(
        self,
        caller: Caller,
        name: str,
        items: Sequence[I],
        one: Callable[[KeyWork, EventBuilder, I], R],
        roles: tuple[Role, ...],
    ) -> list[R | ClientError]:
        """Each item's result or client error, once their audit records committed."""
        with self._audit.operation(caller, name) as scope:
            principal = caller.require(*roles)
            if not 1 <= len(items) <= MAX_BATCH:
                raise InvalidRequest(f"a batch holds 1 to {MAX_BATCH} items")
            if self._admission is not None and len(items) > 1:  # a batch of N costs N
                n = len(items)
                self._admission.admit(principal, caller.request_id, name, n - 1, n)
            try:
                try:
                    results, due = self._attempt(caller, name, principal, items, one, True)
                except _StaleAdmission:  # once more, every row from the database
                    results, due = self._attempt(caller, name, principal, items, one, False)
            except _Aborted as e:
                scope.fail_as(e.ops, len(items) - len(e.ops))
                raise e.error from e.error.__cause__
            scope.written = True
        if due:
            self._audit.checkpoint_quietly()
        return results

    def _attempt(
        self,
        caller: Caller,
        name: str,
        principal: Principal,
        items: Sequence[I],
        one: Callable[[KeyWork, EventBuilder, I], R],
        admissions: bool,
    ) -> tuple[list[R | ClientError], bool]:
        results: list[R | ClientError] = []
        ops: list[EventBuilder] = []
        events: list[AuditEvent] = []
        op = EventBuilder(caller, name)
        try:
            with ExitStack() as reading:
                work = KeyWork(
                    lambda: reading.enter_context(self._storage.reader()),
                    principal,
                    self._cache,
                    self._cases,
                    admissions,
                )
                for item in items:
                    op = EventBuilder(caller, name)
                    ops.append(op)
                    try:
                        results.append(one(work, op, item))
                        events.append(op.ok())
                        work.end_item(True)
                    except ClientError as e:
                        work.end_item(False)
                        results.append(e)
                        events.append(op.failed(e.code, e.detail or e.message))
            op = EventBuilder(caller, name)  # a failure past this point is request-wide
            drafts = self._audit.drafts(events)
            with self._storage.transaction() as tx:
                if caller.claim is not None:
                    caller.claim.claim(tx)  # a replayed signature commits nothing
                try:
                    work.commit(tx)
                except ClientError as e:
                    if work.provisional:
                        work.forget_admissions()
                        raise _StaleAdmission from e
                    raise
                due = self._audit.append_drafts(tx, drafts)
        except _StaleAdmission:
            raise
        except Exception as e:
            # Nothing is returned, so every item is recorded as failed.
            raise _Aborted(ops if len(ops) == len(items) else [*ops, op], e) from e
        return results, due


class _Aborted(Exception):
    """A request-wide failure: ``ops`` are to be recorded as failed with ``error``."""

    def __init__(self, ops: list[EventBuilder], error: Exception) -> None:
        super().__init__(type(error).__name__)
        self.ops = ops
        self.error = error
