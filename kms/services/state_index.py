"""Freshness of sealed rows: an older sealed copy of a row does not pass for the current one.

A seal (kms/services/seals.py) says the server wrote a row, not that it is the newest:
whoever writes the database could put back yesterday's copy of an escrow case (its
budget refilled), of a revoked grant or credential, or of a key before it was disabled.
The HSM anchors which seals are current:

- **State anchor.** A private token object ``kms-state-anchor-<chain id>`` holds
  ``(n, digest)`` (kms/formats/state.py): ``n`` counts the transactions that changed a
  sealed row, ``digest`` is a salted digest of every sealed row's (kind, ident, seal).
  The salt is an HMAC made by the HSM, so nobody without it can find a different set of
  rows with the same digest.
- **The writers.** Every transaction that writes or deletes a sealed row logs the new
  seals under ``n + 1`` in ``state_changes`` and creates the anchor ``(n + 1, digest')``
  before it commits; after the commit the older anchors are destroyed (if the commit
  fails, the new one is). Writers are serialised by the storage's writer lock.
- **The newest anchor is the truth.** Only the state of the anchor with the highest
  ``n`` is accepted. A database behind it is a writer between its new anchor and its
  commit (waited for, up to PENDING_SECONDS), or a writer that died there, or lost
  changes: both refused (StateRefused) until an operator accepts the state.
- **Each process** keeps the index (kind, ident) -> seal of every sealed row. It is built
  from the tables at the first use and must match the newest anchor's digest, or nothing
  sealed is used (StateRefused: a row was rolled back, inserted, duplicated or deleted
  while no process watched). Before its first sealed row, each transaction reads the
  anchor (a cached handle, about 40 us on SoftHSM); if ``n`` moved the process applies
  the logged changes, which must reach the anchor's digest exactly, or it rebuilds from
  the tables (same check).
- **At use** a row's seal must be the index's: a row put back from an older copy is
  refused like a broken seal (SealBroken, the generic refusal, the precise reason in the
  audit trail and an alarm). A row that should exist and does not (a deleted XKS policy
  or custodian, whose absence would be more permissive) is refused too.
- **At each checkpoint** the signer rebuilds the digest from the tables (checkpoint_state)
  so a rollback of a row nobody used is caught there, and the checkpoint carries the
  public digest for the offline verifier.

What it cannot see: a row rolled back and used by a process whose cached handle still
reads the older anchor, in the instant between another transaction's commit and the
destruction of that anchor (milliseconds; a search of the token happens at least every
REFIND_SECONDS, and a writer always searches). A writer killed between creating its
anchor and committing leaves the database behind the newest anchor: refused until
``kms audit accept-state``. A request that reads a row while it is being changed can be
refused like a rollback; retrying succeeds.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from kms.errors import KmsError, StateRefused
from kms.formats import state as fmt
from kms.formats.state import Entry, StateAnchor
from kms.metrics import STATE_REFUSED
from kms.services.hsm_port import Hsm
from kms.services.ports import SealRows, Store, Tx

log = logging.getLogger("kms.state")

LABEL_PREFIX = "kms-state-anchor-"
REFIND_SECONDS = 1.0  # how often a process looks for anchors it has no handle of
PENDING_SECONDS = 2.0  # how long a newer anchor may wait for its writer's commit
RECHECK_SECONDS = 2.0  # how often a refusing process tries again

Changes = Mapping[tuple[str, str], str | None]
ANCHORED = ("anchored", "[]")  # the log entry of an operator's anchoring (no row)


def label(chain_id: str) -> str:
    return LABEL_PREFIX + chain_id


class StateIndex:
    """One per process (thread-safe): the index of current seals, kept fresh against the
    HSM state anchor."""

    def __init__(self, hsm: Hsm, storage: Store[Tx]) -> None:
        self._hsm = hsm
        self._storage = storage
        self._lock = threading.RLock()
        self._chain_id: str | None = None
        self._salt = b""
        self._index: dict[str, dict[str, str]] = {}  # kind -> ident -> seal
        self._at: StateAnchor | None = None  # the anchor the index matches
        self._found_at = 0.0  # monotonic time of the last search of the token
        self._refusal: tuple[float, StateRefused] | None = None

    # -- reading ------------------------------------------------------------------------

    def require(self, kind: str, ident: str, seal: str, follow: bool = True) -> bool:
        """True if ``seal`` is the current seal of row (kind, ident), after following
        the anchor (``follow``: read it now; otherwise the caller did, earlier in the same
        transaction); False if not (the caller refuses it). StateRefused if the state
        cannot be trusted at all, or the database is not anchored (only ``kms init`` and
        ``kms migrate`` write one before anchoring it, and read nothing sealed)."""
        with self._lock:
            if follow or self._at is None:
                self._require_anchored()
            if self._seal_of(kind, ident) == seal:
                return True
            self.sync(refind=True)  # a change committed since this transaction began
            return self._seal_of(kind, ident) == seal

    def holds(self, kind: str, ident: str, follow: bool = True) -> bool:
        """Whether the current state has row (kind, ident) (a row that exists must
        be found: its absence may be more permissive)."""
        with self._lock:
            if follow or self._at is None:
                self._require_anchored()
            if self._seal_of(kind, ident) is not None:
                self.sync(refind=True)  # deleted since this transaction began?
            return self._seal_of(kind, ident) is not None

    def idents(self, kind: str) -> set[str]:
        """The idents of every current row of ``kind``."""
        with self._lock:
            self._require_anchored(refind=True)
            return set(self._index.get(kind, ()))

    def version(self) -> int | None:
        """The change the sealed state is at, once the anchor is followed (one anchor read
        through a cached handle); None if the database is not anchored. A value read at
        this change stays true while this returns the same number (the auth caches,
        kms/services/principals.py). StateRefused as for any sealed read."""
        with self._lock:
            if not self.sync():
                return None
            return None if self._at is None else self._at.n

    def _require_anchored(self, refind: bool = False) -> None:
        if not self.sync(refind):
            raise StateRefused(detail="this database's sealed state is not anchored (kms init)")

    def _seal_of(self, kind: str, ident: str) -> str | None:
        return self._index.get(kind, {}).get(ident)

    def warm(self, retry_seconds: float = 0.5) -> threading.Thread:
        """Start building the index in the background (each worker at start), so that a
        row rolled back later is refused row by row, not as a database that matches no
        anchor. It reads every sealed row (about 2.6 s per 100,000 keys here), so it
        does not hold up the worker's start; a request that needs the index first waits
        for it. A failure (the rows kept changing while read, an HSM or database error)
        is logged once and tried again until the index is built: a worker whose index
        is still empty when a row is rolled back refuses every sealed row."""

        def build() -> None:
            wait, logged = retry_seconds, False
            while True:
                try:
                    if self.sync():  # False: nothing anchored to index (yet)
                        log.info("sealed state indexed", extra={"detail": self._describe()})
                    return
                except Exception as e:
                    if not logged:
                        code = e.code if isinstance(e, KmsError) else type(e).__name__
                        log.warning("sealed state not indexed at start", extra={"code": code})
                        logged = True
                time.sleep(wait)
                wait = min(wait * 2, 30.0)

        thread = threading.Thread(target=build, name="kms-state-index", daemon=True)
        thread.start()
        return thread

    def _describe(self) -> str:
        with self._lock:
            rows = sum(len(x) for x in self._index.values())
            return f"change {self._at.n if self._at else '-'}, {rows} rows"

    def sync(self, refind: bool = False) -> bool:
        """Bring the index to the newest anchor; False if the database is not anchored.
        StateRefused if the database's sealed rows match no anchor."""
        with self._lock:
            now = time.monotonic()
            if self._refusal is not None and now - self._refusal[0] < RECHECK_SECONDS:
                raise self._refusal[1]
            try:
                anchored = self._sync(now, refind)
            except StateRefused as e:
                # the index is kept: it holds a state an anchor once vouched for, from
                # which a later catch-up can go on (a writer slow to commit)
                self._refusal = (now, e)
                STATE_REFUSED.inc()
                log.error("sealed state refused; no sealed row is used", extra={"detail": e.detail})
                raise
            self._refusal = None
            return anchored

    def _sync(self, now: float, refind: bool) -> bool:
        if self._chain_id is None:
            with self._storage.reader() as tx:
                chain_id = tx.audit_chain_id()
            if chain_id is None:
                return False
            # the salt first: a chain id remembered without it would make every digest
            # wrong (an HSM call that failed here once refused the worker for good)
            self._salt = self._hsm.mac(f"KMS-STATE-SALT-1\n{chain_id}".encode())
            self._chain_id = chain_id
        refind = refind or self._at is None or now - self._found_at >= REFIND_SECONDS
        deadline = now + PENDING_SECONDS
        while True:
            anchors = self._anchors(refind)
            if refind:
                self._found_at = time.monotonic()
            newest = max(anchors)
            if [a.n for a in anchors].count(newest.n) > 1:
                raise StateRefused(detail=f"the HSM holds two state anchors at change {newest.n}")
            if self._at == newest:
                if len(anchors) > 1:
                    self._drop_older(anchors, newest)
                return True
            with self._storage.reader() as tx:
                logged = tx.state_seq()
            if logged >= newest.n:
                if self._at is None or not self._catch_up(newest):
                    self._rebuild()  # StateRefused if the rows are not an anchor's
                if self._at is not None and self._at.n >= newest.n:
                    refind = True
                    continue  # the anchor just indexed, found again
            if time.monotonic() >= deadline:
                raise StateRefused(
                    detail=f"the database's sealed state (change {logged}) is behind the HSM "
                    f"state anchor (change {newest.n}): a writer died before its commit, or "
                    "the database lost changes (a rollback, an older backup)"
                    if logged < newest.n
                    else "the sealed rows kept changing while they were read"
                )
            time.sleep(0.005)  # a writer between its new anchor and its commit
            refind = True

    def _anchors(self, refind: bool) -> list[StateAnchor]:
        assert self._chain_id is not None
        values = self._hsm.anchor_values(label(self._chain_id), cached=not refind)
        if not values:
            # a token that is gone holds no anchor either: that is an HSM outage
            # (HsmUnavailable, tried again at the next use), not a database to refuse
            self._hsm.check()
            raise StateRefused(detail=f"the HSM holds no state anchor for chain {self._chain_id}")
        try:
            return [_decode(v) for v in values]
        except fmt.StateFormatError as e:
            raise StateRefused(detail=f"the HSM state anchor is unreadable: {e}") from e

    def _catch_up(self, newest: StateAnchor) -> bool:
        """Apply the changes logged since the index's anchor up to ``newest``; True if
        they reach exactly its digest (the index is then ``newest``'s)."""
        assert self._at is not None
        with self._storage.reader() as tx:
            logged = tx.state_changes(self._at.n)
        changes = {(k, i): seal for n, k, i, seal in logged if n <= newest.n}
        if self._digest_after(self._at.digest, changes) != newest.digest:
            log.warning("the state log does not reach the HSM state anchor; rebuilding")
            return False
        self._apply(changes)
        self._at = newest
        return True

    def _rebuild(self) -> None:
        """Index the tables as they are now, brought by the log to the newest anchor the
        token holds after they were read (so that writers committing meanwhile are
        followed, not chased); StateRefused if that does not reach its digest exactly.
        Returns with the index unchanged if the newest anchor's commit is not in the log
        yet (the caller waits) or the rows changed while they were read."""
        snapshot = self._snapshot()
        if snapshot is None:
            return
        n, entries = snapshot
        newest = max(self._anchors(refind=True))  # at or past the rows' change
        with self._storage.reader() as tx:
            logged = [c for c in tx.state_changes(n) if c[0] <= newest.n]
        if n < newest.n and (not logged or logged[-1][0] < newest.n):
            return  # a writer between its anchor and its commit
        index: dict[str, dict[str, str]] = {}  # unsealed rows ("-") too
        _apply(index, {(k, i): seal for k, i, seal in entries})
        changes = {(k, i): seal for _, k, i, seal in logged}
        digest = fmt.anchored_digest(self._salt, entries)
        if n > newest.n or self._digest_after(digest, changes, index) != newest.digest:
            raise StateRefused(
                detail=f"the sealed rows (change {n}) do not match the HSM state anchor "
                f"(change {newest.n}): a row was rolled back, inserted or deleted in the "
                "database"
            )
        _apply(index, changes)
        self._index, self._at = index, newest

    def _snapshot(self) -> tuple[int, list[Entry]] | None:
        """The sealed rows and the change they are at, or None if a writer committed
        while they were read (PostgreSQL reads each table at its own moment at READ
        COMMITTED: the change read before and after the rows then differs)."""
        with self._storage.reader() as tx:
            n = tx.state_seq()
            entries = unique(tx.sealed_rows())
            if tx.state_seq() != n:
                return None
        return n, entries

    def _digest_after(
        self, digest: int, changes: Changes, index: dict[str, dict[str, str]] | None = None
    ) -> int:
        """The digest ``digest`` of ``index`` (this process's) once ``changes`` (the last
        seal of each row) are applied; the index itself is not touched."""
        index = self._index if index is None else index
        for (kind, ident), seal in changes.items():
            old = index.get(kind, {}).get(ident)
            if old is not None:
                digest -= fmt.element(self._salt, kind, ident, old)
            if seal is not None:
                digest += fmt.element(self._salt, kind, ident, seal)
        return digest % fmt.MODULUS

    def _apply(self, changes: Changes) -> None:
        _apply(self._index, changes)

    def _drop_older(self, anchors: list[StateAnchor], current: StateAnchor) -> None:
        assert self._chain_id is not None
        for a in anchors:
            if a.n < current.n:
                self._hsm.drop_anchor(label(self._chain_id), a.encode())

    # -- writing ------------------------------------------------------------------------

    def record(self, tx: SealRows, changes: Changes) -> Callable[[bool], None] | None:
        """Inside a writer's transaction, before it commits: log ``changes`` and create
        the next anchor. Returns what to call once the commit succeeded (True) or failed
        (False); None on a database that is not anchored yet. Raises (and the caller
        rolls back) if the HSM cannot take the anchor."""
        with self._lock:
            # the token searched, not read through a cached handle: another node's writer
            # may have committed (and not yet destroyed its older anchor) just before
            if not self.sync(refind=True):
                return None
            assert self._at is not None and self._chain_id is not None
            changes = dict(changes)
            new = StateAnchor(self._at.n + 1, self._digest_after(self._at.digest, changes))
            tx.add_state_changes(new.n, changes)
            name = label(self._chain_id)
            self._hsm.add_anchor(name, new.encode())
            previous = self._at

        def finish(committed: bool) -> None:
            with self._lock:
                try:
                    if committed:
                        if self._at == previous:  # else a sync already applied it
                            self._apply(changes)
                            self._at = new
                        # the older ones only: on PostgreSQL the writers' lock is gone
                        # with the commit, and another node's newer anchor may exist
                        self._drop_older(self._anchors(refind=True), new)
                    else:
                        self._hsm.drop_anchor(name, new.encode())
                except Exception:
                    log.exception("could not drop a state anchor")

        return finish

    # -- operator steps and checkpoints ------------------------------------------------

    def anchor(self, chain_id: str) -> StateAnchor:
        """``kms init`` / ``kms migrate`` / ``kms audit accept-state``: make the sealed
        rows as they are found now the state anchor of ``chain_id``, replacing any
        anchor it had (under the writer lock: no change slips in between). The caller
        records that in the audit trail. The state moves to a new change ``n`` (logged
        with no row), so that no two anchored states ever share one ``n``."""
        with self._lock, self._storage.transaction() as tx:
            salt = self._hsm.mac(f"KMS-STATE-SALT-1\n{chain_id}".encode())
            digest = fmt.anchored_digest(salt, unique(tx.sealed_rows()))
            new = StateAnchor(tx.state_seq() + 1, digest)
            tx.add_state_changes(new.n, {ANCHORED: None})
            name = label(chain_id)
            old = self._hsm.anchor_values(name)
            self._hsm.add_anchor(name, new.encode())
            for value in old:
                if value != new.encode():
                    self._hsm.drop_anchor(name, value)
            self._chain_id, self._at, self._refusal = None, None, None  # rebuilt at next use
            return new

    def anchored(self, chain_id: str) -> bool:
        """Whether the token holds a state anchor for ``chain_id``."""
        return bool(self._hsm.anchor_values(label(chain_id)))

    def verified_state(self) -> tuple[int, list[Entry]]:
        """The sealed rows as (kind, ident, seal) and the change ``n`` they are at, read
        from the tables and checked against the HSM anchor (StateRefused if they do not
        match it: a rollback of a row nobody used yet is caught here, at each checkpoint
        and state export)."""
        for _ in range(3):
            snapshot = self._snapshot()
            if snapshot is None:
                continue
            n, entries = snapshot
            with self._lock:
                if not self.sync(refind=True):
                    raise StateRefused(detail="this database's sealed state is not anchored")
                assert self._at is not None
                if self._at.n != n:
                    continue  # a writer committed in between: read again
                if fmt.anchored_digest(self._salt, entries) != self._at.digest:
                    STATE_REFUSED.inc()
                    reason = (
                        f"the sealed rows at change {n} do not match the state the HSM "
                        "anchored: a row was rolled back, inserted or deleted in the database"
                    )
                    log.error("sealed state refused", extra={"detail": reason})
                    raise StateRefused(detail=reason)
                return n, entries
        raise StateRefused(detail="the sealed state kept changing; try again")

    def checkpoint_state(self) -> tuple[int, str]:
        """``(n, public digest)`` of the verified sealed state, for a checkpoint."""
        n, entries = self.verified_state()
        return n, fmt.public_digest(entries)


@functools.lru_cache(maxsize=64)
def _decode(value: bytes) -> StateAnchor:
    """fmt.decode, remembered: the same few values are read before every transaction."""
    return fmt.decode(value)


def unique(entries: Iterable[Entry]) -> list[Entry]:
    """``entries`` as a list; StateRefused if a row appears twice (its table's key was
    dropped in the database to hold two copies)."""
    out = list(entries)
    seen = {(kind, ident) for kind, ident, _ in out}
    if len(seen) != len(out):
        raise StateRefused(detail="a sealed row appears twice: a table's key was removed")
    return out


def _apply(index: dict[str, dict[str, str]], changes: Changes) -> None:
    for (kind, ident), seal in changes.items():
        if seal is None:
            index.get(kind, {}).pop(ident, None)
        else:
            index.setdefault(kind, {})[ident] = seal
