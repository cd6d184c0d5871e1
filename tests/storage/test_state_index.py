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
from kms.errors import SealBroken, StateRefused
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


def test_a_crash_leftover_anchor_is_harmless_and_cleared(
    any_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """A writer that died after creating its anchor but before its commit leaves an
    anchor the database never reached: every process goes on with the older one, and
    the next change removes it."""
    key = _key(any_storage)
    (current,) = _anchors(any_storage, hsm)
    with any_storage.reader() as tx:
        label = state_index.label(str(tx.audit_chain_id()))
    hsm.add_anchor(label, fmt.StateAnchor(current.n + 1, 12345).encode())
    assert _read(_worker(any_storage, hsm)) == key
    with any_storage.transaction() as tx:
        tx.update_key(replace(key, description="x"))
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
