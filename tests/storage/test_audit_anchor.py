"""The audit chain's HSM anchor (kms/services/audit_anchor.py) on a real SoftHSM token,
SQLite and PostgreSQL: concurrent signers share one anchor, a missing or unreadable
anchor stops signing and appends without ever starting a new one, and the crash leftovers
of an update (two objects) resolve to the newest."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage, make_engine
from kms.backends.storage import schema as t
from kms.errors import AuditStateRefused, Conflict
from kms.formats.anchor import Anchor, decode
from kms.services.audit import AuditTrail, CheckpointPolicy
from kms.services.audit_anchor import AuditAnchor
from kms.services.clock import SystemClock
from kms.services.model import AuditEvent
from kms.services.seals import RowSeals


def _label(storage: SqlStorage) -> str:
    with storage.reader() as tx:
        chain_id = tx.audit_chain_id()
    assert chain_id is not None
    return AuditAnchor.label(chain_id)


def _anchors(hsm: Pkcs11Hsm, storage: SqlStorage) -> list[Anchor]:
    return sorted(decode(v) for v in hsm.anchor_values(_label(storage)))


def test_concurrent_signers_on_one_anchor(
    any_database_url: str, any_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """Four writers (own engines), each appending and signing checkpoints at once, as the
    workers of several nodes do: nobody is refused, and the anchor ends at the newest
    signed head."""
    engines = [make_engine(any_database_url, "NORMAL") for _ in range(4)]
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def work(n: int, engine: sa.Engine) -> None:
        trail = AuditTrail(
            SqlStorage(engine, RowSeals(hsm)), SystemClock(), hsm, CheckpointPolicy(0)
        )
        start.wait()
        try:
            for i in range(10):
                trail.record([AuditEvent(f"t{n}-{i}", "svc", "encrypt")])
                trail.checkpoint()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n, e)) for n, e in enumerate(engines)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for engine in engines:
        engine.dispose()
    assert [getattr(e, "detail", e) for e in errors] == []
    trail = AuditTrail(any_storage, SystemClock(), hsm, CheckpointPolicy(0))
    newest = trail.checkpoint()
    assert newest is not None and newest["seq"] == 40
    assert _anchors(hsm, any_storage)[-1] == Anchor(40, newest["record_hash"])
    trail.verify_anchor()


def test_missing_anchor_refuses_and_is_never_recreated(storage: SqlStorage, hsm: Pkcs11Hsm) -> None:
    trail = AuditTrail(storage, SystemClock(), hsm, CheckpointPolicy(0))
    trail.record([AuditEvent("r1", "svc", "encrypt")])
    label = _label(storage)
    for value in hsm.anchor_values(label):
        hsm.drop_anchor(label, value)
    fresh = AuditTrail(storage, SystemClock(), hsm, CheckpointPolicy(0))  # a new worker
    with pytest.raises(AuditStateRefused) as refused:
        fresh.record([AuditEvent("r2", "svc", "encrypt")])
    assert "holds no anchor" in (refused.value.detail or "")
    with pytest.raises(AuditStateRefused):
        trail.checkpoint()
    assert hsm.anchor_values(label) == []  # nothing started a new anchor
    with storage.reader() as tx:
        assert [r["request_id"] for r in tx.audit_records(0, 10)] == ["r1"]
    assert fresh.anchor_new_chain() is None  # kms init does not re-anchor a named chain
    assert hsm.anchor_values(label) == []


def test_unreadable_anchor_refuses(storage: SqlStorage, hsm: Pkcs11Hsm) -> None:
    label = _label(storage)
    hsm.add_anchor(label, b"KMS-ANCHOR-1\n{not json")
    trail = AuditTrail(storage, SystemClock(), hsm, CheckpointPolicy(0))
    with pytest.raises(AuditStateRefused) as refused:
        trail.record([AuditEvent("r1", "svc", "encrypt")])
    assert "unreadable" in (refused.value.detail or "")


def test_two_anchor_objects_resolve_to_the_newest(storage: SqlStorage, hsm: Pkcs11Hsm) -> None:
    """A signer that died between creating the new object and destroying the old one:
    the newest counts, and the next advance removes the leftover."""
    trail = AuditTrail(storage, SystemClock(), hsm, CheckpointPolicy(0))
    trail.record([AuditEvent("r1", "svc", "encrypt")])
    first = trail.checkpoint()
    assert first is not None
    trail.record([AuditEvent("r2", "svc", "encrypt")])
    with storage.reader() as tx:
        head = tx.audit_head()
    hsm.add_anchor(_label(storage), Anchor(head.seq, head.hash).encode())  # the crash
    assert len(_anchors(hsm, storage)) == 2
    trail.verify_anchor()
    trail.record([AuditEvent("r3", "svc", "encrypt")])
    newest = trail.checkpoint()
    assert newest is not None
    assert _anchors(hsm, storage) == [Anchor(newest["seq"], newest["record_hash"])]


def test_a_broken_link_after_the_anchor_is_refused_at_signing(
    storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """A running worker that already checked the anchor still refuses to sign a head whose
    chain was cut after the anchor, and refuses appends from then on."""
    trail = AuditTrail(storage, SystemClock(), hsm, CheckpointPolicy(0))
    trail.record([AuditEvent("r1", "svc", "encrypt")])
    trail.checkpoint()
    trail.record([AuditEvent("r2", "svc", "decrypt")])
    trail.record([AuditEvent("r3", "svc", "decrypt")])
    with storage.transaction() as tx:
        tx._c.execute(sa.delete(t.audit_records).where(t.audit_records.c.seq == 2))
    with pytest.raises(AuditStateRefused) as refused:
        trail.checkpoint()
    assert "broken" in (refused.value.detail or "")
    with pytest.raises(AuditStateRefused):
        trail.record([AuditEvent("r4", "svc", "encrypt")])


def test_an_edited_record_after_the_anchor_is_refused_by_a_new_worker(
    storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """A record edited in place after the anchor (its stored hash kept): a worker's first
    check re-hashes every record since the anchor and refuses (a signer only checks the
    links; the offline verifier re-hashes everything)."""
    trail = AuditTrail(storage, SystemClock(), hsm, CheckpointPolicy(0))
    trail.record([AuditEvent("r1", "svc", "encrypt")])
    trail.checkpoint()
    trail.record([AuditEvent("r2", "svc", "decrypt")])
    with storage.transaction() as tx:
        tx._c.execute(
            sa.update(t.audit_records).where(t.audit_records.c.seq == 2).values(principal="x")
        )
    fresh = AuditTrail(storage, SystemClock(), hsm, CheckpointPolicy(0))
    with pytest.raises(AuditStateRefused) as refused:
        fresh.record([AuditEvent("r3", "svc", "encrypt")])
    assert "record hash does not match its content" in (refused.value.detail or "")


def test_kms_init_anchors_only_while_the_token_anchors_no_other_chain(
    db_path: object, hsm: Pkcs11Hsm, storage: SqlStorage, tmp_path: object
) -> None:
    """The session's token anchors the ``storage`` fixture's chain; a second database
    without a chain id is not anchored silently next to it."""
    from pathlib import Path

    from kms.backends.storage import upgrade

    engine = make_engine(f"sqlite:///{Path(str(tmp_path)) / 'second.sqlite3'}", "NORMAL")
    upgrade(engine)
    try:
        second = AuditTrail(SqlStorage(engine, RowSeals(hsm)), SystemClock(), hsm)
        with pytest.raises(Conflict) as conflict:
            second.anchor_new_chain()
        assert "accept-state" in conflict.value.message
        with pytest.raises(AuditStateRefused):
            second.record([AuditEvent("r1", "svc", "encrypt")])
    finally:
        engine.dispose()


def test_signed_history_deleted_and_called_an_archive_is_refused(
    storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """The database writer deletes records up to a checkpoint and marks them archived:
    the HSM anchor says nothing was archived, so nothing more is appended or signed."""
    trail = AuditTrail(storage, SystemClock(), hsm, CheckpointPolicy(0))
    for i in range(3):
        trail.record([AuditEvent(f"r{i}", "svc", "decrypt")])
    cp = trail.checkpoint()
    assert cp is not None
    with storage.transaction() as tx:
        tx._c.execute(sa.delete(t.audit_records).where(t.audit_records.c.seq <= cp["seq"]))
        tx._c.execute(sa.update(t.audit_head).values(archived_seq=cp["seq"]))
    fresh = AuditTrail(storage, SystemClock(), hsm, CheckpointPolicy(0))
    with pytest.raises(AuditStateRefused) as refused:
        fresh.record([AuditEvent("r3", "svc", "encrypt")])
    assert "signed history was deleted" in (refused.value.detail or "")
    with pytest.raises(AuditStateRefused):
        fresh.verify_anchor()


def test_a_head_row_that_claims_every_record_is_signed_still_gets_signed(
    storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """A trigger that moves checkpoint_seq with every append would stop all signing if the
    signer trusted it: it signs (and stores) from the checkpoint rows instead."""
    with storage.transaction() as tx:
        tx._c.exec_driver_sql(
            "CREATE TRIGGER claim_signed AFTER UPDATE OF seq ON audit_head BEGIN "
            "UPDATE audit_head SET checkpoint_seq = NEW.seq; END"
        )
    trail = AuditTrail(storage, SystemClock(), hsm, CheckpointPolicy(0))
    trail.record([AuditEvent("r1", "svc", "encrypt")])
    cp = trail.checkpoint()
    assert cp is not None and cp["seq"] == 1
    with storage.reader() as tx:
        assert [c["seq"] for c in tx.checkpoints(0, None, 10)] == [1]
    assert _anchors(hsm, storage)[-1].seq == 1
