"""The freshness of sealed rows (kms/services/state_index.py) on a real SoftHSM token and
on SQLite and PostgreSQL: each SqlStorage below with its own RowSeals stands for another
worker process (its own index), sharing the database and the token."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from kms.errors import HsmUnavailable, SealBroken, StateRefused
from kms.formats import state as fmt
from kms.services import state_index
from kms.services.model import Grant, Key, KeyState, Role
from kms.services.seals import RowSeals


def _worker(storage: SqlStorage, hsm: Pkcs11Hsm) -> SqlStorage:
    return SqlStorage(storage._engine, RowSeals(hsm))


def _key(storage: SqlStorage, key_id: str = "k1") -> Key:
    now = datetime.now(UTC)
    key = Key(key_id, None, "", KeyState.ENABLED, 1, now, None, None, None, 1, now)
    with storage.transaction() as tx:
        tx.add_key(key)
    return key


def _read(storage: SqlStorage, key_id: str = "k1") -> Key | None:
    with storage.reader() as tx:
        return tx.key_by_id(key_id)


def _raw(storage: SqlStorage, sql: str, **params: Any) -> Any:
    with storage._engine.begin() as c:
        return c.execute(sa.text(sql), params)


def _anchors(storage: SqlStorage, hsm: Pkcs11Hsm) -> list[fmt.StateAnchor]:
    with storage.reader() as tx:
        chain_id = tx.audit_chain_id()
    assert chain_id is not None
    return sorted(fmt.decode(v) for v in hsm.anchor_values(state_index.label(chain_id)))


def test_another_process_follows_a_change_and_refuses_its_rollback(
    any_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    key = _key(any_storage)
    other = _worker(any_storage, hsm)
    assert _read(other) == key  # the other process indexed it
    old = _raw(any_storage, "SELECT state, seal FROM keys WHERE key_id = 'k1'").one()
    with any_storage.transaction() as tx:
        tx.update_key(replace(key, state=KeyState.DISABLED))
    found = _read(other)
    assert found is not None and found.state is KeyState.DISABLED  # followed, not refused
    _raw(any_storage, "UPDATE keys SET state = :s, seal = :x", s=old.state, x=old.seal)
    for process in (any_storage, other):
        with pytest.raises(SealBroken) as refused:
            _read(process)
        assert "the key row k1 is an older sealed copy" in str(refused.value.detail)
    # a process that starts now finds rows that match no anchor: it refuses them all
    with pytest.raises(StateRefused) as stopped:
        _read(_worker(any_storage, hsm))
    assert "rolled back, inserted or deleted" in str(stopped.value.detail)


def test_each_change_moves_the_anchor_once_and_a_failed_commit_leaves_none(
    any_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    first = _anchors(any_storage, hsm)
    assert len(first) == 1
    _key(any_storage)
    (after,) = _anchors(any_storage, hsm)
    assert after.n == first[0].n + 1 and after.digest != first[0].digest
    key = _read(any_storage)
    assert key is not None
    with pytest.raises(RuntimeError), any_storage.transaction() as tx:
        tx.update_key(replace(key, state=KeyState.DISABLED))
        raise RuntimeError("the request fails after its write")
    assert _anchors(any_storage, hsm) == [after]
    with any_storage.reader() as tx:
        assert tx.state_seq() == after.n


def test_a_writer_that_died_before_its_commit_needs_an_operator(
    any_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """A writer killed after creating its anchor but before its commit leaves the
    database behind the newest anchor, which the database cannot tell from a lost
    commit: refused (after waiting for a commit that never comes) until an operator
    anchors the state again, as ``kms audit accept-state`` does."""
    key = _key(any_storage)
    (current,) = _anchors(any_storage, hsm)
    with any_storage.reader() as tx:
        chain_id = str(tx.audit_chain_id())
    hsm.add_anchor(state_index.label(chain_id), fmt.StateAnchor(current.n + 1, 12345).encode())
    with pytest.raises(StateRefused) as refused:
        _read(_worker(any_storage, hsm))
    assert "behind the HSM state anchor" in str(refused.value.detail)
    state_index.StateIndex(hsm, any_storage).anchor(chain_id)
    assert _read(_worker(any_storage, hsm)) == key
    (only,) = _anchors(any_storage, hsm)
    assert only.n == current.n + 1 and only.digest != 12345


def test_a_log_edited_in_the_database_is_not_believed(
    any_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """The logged changes must reach the anchor's digest: a process catching up through
    a log whose seal was swapped rebuilds from the tables instead (which are right), and
    if the tables were rolled back too it refuses everything."""
    key = _key(any_storage)
    other = _worker(any_storage, hsm)
    assert _read(other) == key
    old_seal = _raw(any_storage, "SELECT seal FROM keys").scalar_one()
    with any_storage.transaction() as tx:
        tx.update_key(replace(key, state=KeyState.DISABLED))
    _raw(any_storage, "UPDATE state_changes SET seal = :x WHERE kind = 'key'", x=old_seal)
    found = _read(other)
    assert found is not None and found.state is KeyState.DISABLED
    third = _worker(any_storage, hsm)
    assert _read(third) == found
    with any_storage.transaction() as tx:  # the third process must catch up again
        tx.update_key(replace(found, description="y"))
    _raw(any_storage, "UPDATE state_changes SET seal = :x WHERE kind = 'key'", x=old_seal)
    _raw(any_storage, "UPDATE keys SET state = 'enabled', description = '', seal = :x", x=old_seal)
    with pytest.raises(StateRefused):
        _read(third)


def test_a_row_deleted_where_its_absence_widens_access_is_refused(
    any_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    from kms.formats.xks import XksKeyPolicy

    _key(any_storage)
    with any_storage.transaction() as tx:
        tx.put_xks_policy("k1", XksKeyPolicy(frozenset({"encrypt"}), None, None), "now")
    _raw(any_storage, "DELETE FROM xks_key_policies")
    with pytest.raises(SealBroken) as refused, any_storage.reader() as tx:
        tx.xks_policy("k1")
    assert "was deleted from the database" in str(refused.value.detail)
    with any_storage.reader() as tx:
        assert tx.xks_policy("no-such-key") is None  # never had one: the default


def test_concurrent_writers_share_one_anchor(any_storage: SqlStorage, hsm: Pkcs11Hsm) -> None:
    """Four processes change sealed rows at once: n counts every transaction, one anchor
    remains, and a process starting afterwards finds the tables matching it."""
    _key(any_storage)
    workers = [_worker(any_storage, hsm) for _ in range(4)]
    errors: list[BaseException] = []

    def run(i: int, storage: SqlStorage) -> None:
        try:
            for j in range(5):
                with storage.transaction() as tx:
                    ops = frozenset({"decrypt"}) if j % 2 else frozenset({"encrypt"})
                    tx.put_grant("k1", ids[i], Grant(ops))
        except BaseException as e:
            errors.append(e)

    with any_storage.transaction() as tx:
        ids = [
            tx.add_principal(f"p{i}", Role.SERVICE, f"{i:064x}", datetime.now(UTC)).id
            for i in range(4)
        ]
    (start,) = _anchors(any_storage, hsm)
    threads = [threading.Thread(target=run, args=(i, w)) for i, w in enumerate(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    (end,) = _anchors(any_storage, hsm)
    assert end.n == start.n + 20
    fresh = state_index.StateIndex(hsm, any_storage)
    assert fresh.checkpoint_state()[0] == end.n  # the tables match the anchor
    with any_storage.reader() as tx:
        assert len(tx.state_changes(start.n)) == 20


def test_a_missing_state_anchor_is_recreated_only_for_a_database_from_before_it(
    any_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """``kms migrate`` anchors the sealed state of a chain anchored before freshness
    existed (its state log is empty), as found and recorded; a state anchor that existed
    and is gone is never recreated by it: reads are refused until accept-state."""
    from kms.app import build_services
    from kms.bootstrap import anchor_sealed_state

    services = build_services(any_storage, hsm)
    with any_storage.reader() as tx:
        label = state_index.label(str(tx.audit_chain_id()))

    def drop() -> None:
        for value in hsm.anchor_values(label):
            hsm.drop_anchor(label, value)

    drop()  # a database from before freshness: no anchor, nothing logged
    _raw(any_storage, "DELETE FROM state_changes")
    anchor_sealed_state(any_storage, services, new_chain=False)
    assert len(hsm.anchor_values(label)) == 1
    with any_storage.reader() as tx:
        assert tx.audit_records(0, 10, query=None)[-1]["operation"] == "anchor_sealed_state"
    key = _key(any_storage)  # logged as change 1
    drop()
    anchor_sealed_state(any_storage, services, new_chain=False)
    assert hsm.anchor_values(label) == []
    with pytest.raises(StateRefused) as refused:
        _read(_worker(any_storage, hsm))
    assert "holds no state anchor" in str(refused.value.detail)
    problem, _ = services.audit.accept_state("INC-7: state anchor lost")
    assert problem is not None and "no state anchor" in problem
    assert _read(_worker(any_storage, hsm)) == key


# -- the attacks of the review of this change ------------------------------------------


def _grant_setup(storage: SqlStorage) -> int:
    now = datetime.now(UTC)
    with storage.transaction() as tx:
        tx.add_key(Key("k1", None, "", KeyState.ENABLED, 1, now, None, None, None, 1, now))
        pid = tx.add_principal("svc", Role.SERVICE, "ab" * 32, now).id
        tx.put_grant("k1", pid, Grant(frozenset({"decrypt"})))
    return pid


def _grant(storage: SqlStorage, pid: int) -> Grant:
    with storage.reader() as tx:
        return tx.grant("k1", pid)


class _Hooked:
    """The real HSM; ``on_drop`` runs once in place of the first drop_anchor, and
    ``on_add`` once before the next add_anchor."""

    def __init__(self, hsm: Pkcs11Hsm) -> None:
        self._hsm = hsm
        self.on_drop: Any = None
        self.on_add: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hsm, name)

    def drop_anchor(self, label: str, value: bytes) -> None:
        hook, self.on_drop = self.on_drop, None
        (hook or self._hsm.drop_anchor)(label, value)

    def add_anchor(self, label: str, value: bytes) -> None:
        hook, self.on_add = self.on_add, None
        if hook is not None:
            hook()
        self._hsm.add_anchor(label, value)


def test_a_second_node_writing_between_a_commit_and_its_anchor_drop(
    pg_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """On PostgreSQL the writers' advisory lock ends at the commit, before the older
    anchor is destroyed: another node's writer in that gap must build on the newest
    anchor, and neither may destroy the other's (review finding 1)."""
    pid = _grant_setup(pg_storage)
    old = _raw(pg_storage, "SELECT operations, seal FROM grants").one()
    h1, h2 = _Hooked(hsm), _Hooked(hsm)
    node1 = SqlStorage(pg_storage._engine, RowSeals(h1))  # type: ignore[arg-type]
    node2 = SqlStorage(pg_storage._engine, RowSeals(h2))  # type: ignore[arg-type]
    for node in (node1, node2):
        assert _grant(node, pid).operations == {"decrypt"}  # both follow the anchor
    now = datetime.now(UTC)

    def node2_writes_in_the_gap(label: str, value: bytes) -> None:
        h2.on_add = lambda: hsm.drop_anchor(label, value)  # node 1's drop lands here
        with node2.transaction() as tx:
            tx.add_key(Key("k2", None, "", KeyState.ENABLED, 1, now, None, None, None, 1, now))

    h1.on_drop = node2_writes_in_the_gap
    with node1.transaction() as tx:
        tx.put_grant("k1", pid, Grant())  # an admin revokes the grant on node 1
    (only,) = _anchors(pg_storage, hsm)
    with pg_storage.reader() as tx:
        assert tx.state_seq() == only.n
    assert state_index.StateIndex(hsm, pg_storage).checkpoint_state()[0] == only.n
    _raw(pg_storage, "UPDATE grants SET operations = :o, seal = :s", o=old[0], s=old[1])
    for process in (node1, node2):
        with pytest.raises(SealBroken):
            _grant(process, pid)
    with pytest.raises(StateRefused):
        _grant(_worker(pg_storage, hsm), pid)
    with pytest.raises(StateRefused):
        state_index.StateIndex(hsm, pg_storage).checkpoint_state()


def test_a_row_stored_twice_cannot_cancel_out(storage: SqlStorage, hsm: Pkcs11Hsm) -> None:
    """A grants table rebuilt without its key, holding the revoked grant's older copy
    twice: a digest where the two copies cancelled would match (review finding 2)."""
    pid = _grant_setup(storage)
    old = _raw(storage, "SELECT operations, justifications, seal FROM grants").one()
    with storage.transaction() as tx:
        tx.put_grant("k1", pid, Grant())
    now = _raw(storage, "SELECT operations, justifications, seal FROM grants").one()
    for sql in (
        "CREATE TABLE g2 AS SELECT * FROM grants",
        "DROP TABLE grants",
        "CREATE TABLE grants (key_id VARCHAR(64), principal_id INTEGER, operations "
        "VARCHAR(64) NOT NULL, justifications VARCHAR(200) NOT NULL, seal VARCHAR(64))",
        "DROP TABLE g2",
    ):
        _raw(storage, sql)
    for row in (old, now, old):
        _raw(
            storage,
            "INSERT INTO grants VALUES ('k1', :p, :o, :j, :s)",
            p=pid,
            o=row[0],
            j=row[1],
            s=row[2],
        )
    with pytest.raises(StateRefused) as refused:
        _grant(_worker(storage, hsm), pid)
    assert "appears twice" in str(refused.value.detail)
    with pytest.raises(StateRefused):
        state_index.StateIndex(hsm, storage).checkpoint_state()


def test_an_older_anchor_left_behind_is_never_accepted(storage: SqlStorage, hsm: Pkcs11Hsm) -> None:
    """The drop of the older anchor fails after a commit (an HSM error); the database
    writer then puts the revoked grant back and deletes the revoke's log entry, so the
    tables match the older anchor: only the newest anchor counts (review finding 3)."""
    pid = _grant_setup(storage)
    old = _raw(storage, "SELECT operations, seal FROM grants").one()
    flaky = _Hooked(hsm)

    def fail(label: str, value: bytes) -> None:
        raise HsmUnavailable(detail="injected after the commit")

    flaky.on_drop = fail
    writer = SqlStorage(storage._engine, RowSeals(flaky))  # type: ignore[arg-type]
    with writer.transaction() as tx:
        tx.put_grant("k1", pid, Grant())
    _, newest = _anchors(storage, hsm)  # the older one stays: its drop failed
    _raw(storage, "UPDATE grants SET operations = :o, seal = :s", o=old[0], s=old[1])
    _raw(storage, "DELETE FROM state_changes WHERE n = :n", n=newest.n)
    fresh = _worker(storage, hsm)
    with pytest.raises(StateRefused) as refused:
        _grant(fresh, pid)
    assert "behind the HSM state anchor" in str(refused.value.detail)
    with pytest.raises(SealBroken):
        _grant(writer, pid)
    with pytest.raises(StateRefused):
        state_index.StateIndex(hsm, storage).checkpoint_state()
    assert max(_anchors(storage, hsm)) == newest  # nobody built on the older one


def test_a_deleted_key_row_does_not_weaken_a_case_policy(
    storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """The strictest escrow policy of the keys a case names: a key row deleted in the
    database is refused, not skipped (review finding 4)."""
    from types import SimpleNamespace

    from kms.services.clock import SystemClock
    from kms.services.escrow_common import EscrowRows, EscrowSettings
    from kms.services.escrow_quorum import Quorum
    from kms.services.model import EscrowPolicy

    now = datetime.now(UTC)
    strict = EscrowPolicy(4, frozenset({"court", "owner"}), frozenset({"owner"}))
    with storage.transaction() as tx:
        key = Key("k1", None, "", KeyState.ENABLED, 1, now, None, None, None, 1, now)
        tx.add_key(replace(key, escrow_policy=strict))
        tx.add_key(replace(key, key_id="k2"))
    quorum = Quorum(EscrowRows(RowSeals(hsm)), EscrowSettings(), SystemClock())
    case: Any = SimpleNamespace(scope={"keys": ["k1", "k2"]})
    with storage.transaction() as tx:
        assert quorum.policy(tx, case).quorum == 4
    _raw(storage, "DELETE FROM keys WHERE key_id = 'k1'")
    with pytest.raises(SealBroken) as refused, storage.transaction() as tx:
        quorum.policy(tx, case)
    assert "the key row k1 was deleted from the database" in str(refused.value.detail)


def test_an_unanchored_database_gives_no_sealed_row(storage: SqlStorage, hsm: Pkcs11Hsm) -> None:
    """The chain id removed from the database does not turn freshness off for a process
    that starts then: it refuses every sealed row (review finding 5)."""
    pid = _grant_setup(storage)
    _raw(storage, "UPDATE audit_head SET chain_id = NULL")
    with pytest.raises(StateRefused) as refused:
        _grant(_worker(storage, hsm), pid)
    assert "not anchored" in str(refused.value.detail)


def test_hostile_values_in_the_state_tables_are_refusals_not_500s(
    storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """SQLite keeps any value in any column (review finding 6)."""
    pid = _grant_setup(storage)
    _raw(storage, "INSERT INTO state_changes (n, kind, ident, seal) VALUES ('x', 'key', 'y', NULL)")
    with pytest.raises(StateRefused):
        _grant(_worker(storage, hsm), pid)
    _raw(storage, "DELETE FROM state_changes WHERE n = 'x'")
    _raw(storage, "UPDATE tokens SET token_sha256 = X'00ff'")
    with pytest.raises(StateRefused):
        state_index.StateIndex(hsm, storage).checkpoint_state()


class _FailingAnchorReads:
    """The real HSM, whose first ``failures`` anchor reads fail (an HSM fault at start)."""

    def __init__(self, hsm: Pkcs11Hsm, failures: int) -> None:
        self._hsm = hsm
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hsm, name)

    def anchor_values(self, label: str, cached: bool = False) -> list[bytes]:
        if self.failures > 0:
            self.failures -= 1
            raise HsmUnavailable(detail="injected: the HSM did not answer")
        return self._hsm.anchor_values(label, cached=cached)


def test_indexing_at_start_tries_again_until_it_succeeds(
    storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """A worker whose first indexing failed still indexes before anyone asks it, so a
    later rollback is refused row by row rather than as a database matching no anchor."""
    _key(storage)
    faulty = _FailingAnchorReads(hsm, failures=2)
    worker = SqlStorage(storage._engine, RowSeals(faulty))  # type: ignore[arg-type]
    assert worker._seals is not None and worker._seals.state is not None
    worker._seals.state.warm(retry_seconds=0.01).join(timeout=30)
    assert faulty.failures == 0
    old = _raw(storage, "SELECT state, seal FROM keys WHERE key_id = 'k1'").one()
    key = _read(storage)
    assert key is not None
    with storage.transaction() as tx:
        tx.update_key(replace(key, state=KeyState.DISABLED))
    _raw(storage, "UPDATE keys SET state = :s, seal = :x", s=old.state, x=old.seal)
    with pytest.raises(SealBroken) as refused:  # the index was built: one row refused
        _read(worker)
    assert "the key row k1 is an older sealed copy" in str(refused.value.detail)
