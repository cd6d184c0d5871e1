"""An outage means an outage (issue 20, point 6): a checkpoint that cannot be signed is an
alarm, and past the unsigned-tail bound audited operations are refused until a checkpoint
is signed again, without rebuilding anything (kms/services/audit_tail.py).

Real SoftHSM token and SQLite; the only fake injects the fault: the real token whose
``sign_digest`` raises HsmUnavailable while ``failing`` is set."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kms.app import Options, Services, build_services
from kms.errors import Forbidden, HsmUnavailable
from kms.metrics import AUDIT_CHECKPOINT_FAILURES, AUDIT_UNSIGNED, AUDIT_UNSIGNED_REFUSED
from kms.services.audit import CheckpointPolicy
from kms.services.audit_events import Caller
from kms.services.change_model import SINGLE_OPERATOR, ControlPolicy
from kms.services.crypto import DataKeyRequest, DecryptRequest
from kms.services.model import Principal

BOUND = 12
SECONDS = 600


class SigningFails:
    """The real HSM backend, except that ``sign_digest`` raises HsmUnavailable while
    ``failing`` (an audit key that stopped signing; everything else keeps working)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.failing = False
        self.attempts = 0

    def sign_digest(self, digest: bytes) -> bytes:
        self.attempts += 1
        if self.failing:
            raise HsmUnavailable(detail="injected: the audit key does not sign")
        return bytes(self._real.sign_digest(digest))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@dataclass
class World:
    services: Services
    hsm: SigningFails
    admin: Caller
    svc: Principal
    storage: Any

    def datakey(self, request_id: str) -> Any:
        caller = Caller(request_id, self.svc)
        return self.services.crypto.datakey(caller, "k", [DataKeyRequest({"n": request_id})])[0]

    def head(self) -> Any:
        with self.storage.reader() as tx:
            return tx.audit_head()

    def request_ids(self) -> set[str]:
        with self.storage.reader() as tx:
            return {r["request_id"] for r in tx.audit_records(0, 1000)}


class Clock:
    """A clock the test moves (the trail reads the time of a failing signature from it)."""

    def __init__(self) -> None:
        self.at = datetime(2026, 12, 8, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at


def _world(
    storage: Any, hsm: Any, every: int, bound: int = BOUND, clock: Clock | None = None
) -> World:
    faulty = SigningFails(hsm)
    options = Options(
        checkpoint=CheckpointPolicy(every, bound, SECONDS), control=ControlPolicy(SINGLE_OPERATOR)
    )
    services = build_services(storage, faulty, clock, options=options)
    assert services.principals.bootstrap_admin("admin")
    with storage.reader() as tx:
        admin = Caller("set-up", tx.principal_by_name("admin"))
    services.keys.create(admin, "k", "")
    _, token = services.principals.create(admin, "svc", "service")
    services.keys.grant(admin, "k", "svc", ["datakey", "decrypt"])
    services.audit.checkpoint()  # the set-up is signed: the tail starts empty
    return World(services, faulty, admin, services.principals.authenticate(token), storage)


def _failures() -> float:
    return float(AUDIT_CHECKPOINT_FAILURES.labels("hsm_unavailable")._value.get())


def test_a_checkpoint_that_cannot_be_signed_raises_an_alarm(
    storage: Any, hsm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    world = _world(storage, hsm, every=3, bound=1000)
    world.hsm.failing = True
    before = _failures()
    with caplog.at_level(logging.ERROR, logger="kms.audit"):
        for i in range(3):  # the third record makes a checkpoint due: it fails
            assert world.datakey(f"r{i}").ciphertext
    assert _failures() == before + 1
    assert AUDIT_UNSIGNED._value.get() == 3
    (alarm,) = [r for r in caplog.records if "checkpoint failed" in r.getMessage()]
    assert alarm.levelno == logging.ERROR and alarm.name == "kms.audit"
    assert alarm.code == "hsm_unavailable"
    assert "injected" in str(alarm.detail)
    # the timer's and shutdown's path raises nothing either, and counts too
    world.services.audit.checkpoint_quietly()
    assert _failures() == before + 2
    world.hsm.failing = False
    world.services.audit.checkpoint_quietly()
    assert _failures() == before + 2 and AUDIT_UNSIGNED._value.get() == 0
    assert world.head().checkpoint_seq == world.head().seq


def test_past_the_unsigned_bound_operations_are_refused_until_signing_works_again(
    storage: Any, hsm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    world = _world(storage, hsm, every=5)
    first = world.datakey("first")
    world.services.audit.checkpoint()
    world.hsm.failing = True
    served = 0
    while world.head().seq - world.head().checkpoint_seq < BOUND:  # fill the tail
        assert world.datakey(f"fill-{served}").ciphertext  # served, though not signed
        served += 1
    assert served == BOUND and AUDIT_UNSIGNED._value.get() == BOUND
    head, ids = world.head(), world.request_ids()
    with storage.reader() as tx:
        keys = tx.list_keys()
    refused_before = AUDIT_UNSIGNED_REFUSED._value.get()
    attempts = world.hsm.attempts
    blob = DecryptRequest(first.ciphertext, {"n": "first"})
    with caplog.at_level(logging.ERROR, logger="kms.audit"):
        _refused(lambda: world.datakey("refused-1"))
        _refused(lambda: world.services.crypto.decrypt(Caller("refused-2", world.svc), [blob]))
        _refused(
            lambda: world.services.keys.create(
                Caller("refused-3", world.admin.principal), "new", ""
            )
        )
        # refused for another reason meanwhile: the caller gets that refusal, its record
        # is refused by the same bound (logged, not chained)
        with pytest.raises(Forbidden):
            world.services.keys.create(Caller("refused-4", world.svc), "mine", "")
    # one attempt to sign before each operation (the HSM may have come back)
    assert world.hsm.attempts == attempts + 4
    assert AUDIT_UNSIGNED_REFUSED._value.get() == refused_before + 4
    refusals = [r for r in caplog.records if "audited operation refused" in r.getMessage()]
    assert len(refusals) == 4
    assert all(r.levelno == logging.ERROR and r.code == "hsm_unavailable" for r in refusals)
    assert "could not record a refused operation" in caplog.text  # refused-4's record
    # nothing was done, nothing chained: the tail stays at its bound
    assert world.head() == head and world.request_ids() == ids
    with storage.reader() as tx:
        assert tx.list_keys() == keys
    # the HSM signs again: the next operation signs first and goes through, on the same
    # services (no restart, nothing rebuilt)
    world.hsm.failing = False
    again = world.datakey("back")
    assert again.plaintext is not None
    (opened,) = world.services.crypto.decrypt(Caller("back-2", world.svc), [blob])
    assert not isinstance(opened, Exception) and opened.plaintext == first.plaintext
    after = world.head()
    assert after.checkpoint_seq >= head.seq and after.seq == head.seq + 2
    assert world.request_ids() - ids == {"back", "back-2"}
    assert AUDIT_UNSIGNED_REFUSED._value.get() == refused_before + 4


def test_a_server_signing_only_by_time_signs_at_half_the_bound_rather_than_refuse(
    storage: Any, hsm: Any
) -> None:
    world = _world(storage, hsm, every=0)  # 0: never by count
    for i in range(BOUND * 3):
        assert world.datakey(f"r{i}").ciphertext
    head = world.head()
    assert head.seq - head.checkpoint_seq < BOUND // 2


def _refused(call: Any) -> HsmUnavailable:
    with pytest.raises(HsmUnavailable) as err:
        call()
    assert err.value.code == "hsm_unavailable" and err.value.status == 503
    return err.value


def test_records_unsigned_for_too_long_are_a_bound_too(storage: Any, hsm: Any) -> None:
    """At low traffic the count bound is far away: once signing has failed for longer
    than KMS_AUDIT_MAX_UNSIGNED_SECONDS, operations are refused as at the count bound,
    and served again once a checkpoint is signed."""
    clock = Clock()
    world = _world(storage, hsm, every=1000, bound=1000, clock=clock)
    world.hsm.failing = True
    assert world.datakey("a").ciphertext
    world.services.audit.checkpoint_quietly()  # the timer's attempt fails: the alarm
    clock.at += timedelta(seconds=SECONDS - 1)
    assert world.datakey("b").ciphertext  # within the bound
    clock.at += timedelta(seconds=2)
    head = world.head()
    err = _refused(lambda: world.datakey("c"))
    assert "KMS_AUDIT_MAX_UNSIGNED_SECONDS" in str(err.detail)
    assert world.head() == head  # nothing chained
    world.hsm.failing = False
    assert world.datakey("d").ciphertext  # signs first, then served
    assert world.head().checkpoint_seq >= head.seq
