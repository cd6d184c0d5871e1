"""The other shared uses of a real Redis: the cache-invalidation stream, the scheduler
lease, and what each does while Redis is down or after it came back empty."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from kms.app import Options, build_services
from kms.backends.redis_store import RETRY_SECONDS, RedisBus, RedisConnection, RedisLeases
from kms.services.audit_events import Caller
from kms.services.change_model import SINGLE_OPERATOR, ControlPolicy
from kms.services.cluster import KEY, ClusterSettings, Invalidations
from kms.services.key_params import MIN_PENDING_DAYS
from kms.services.model import KeyState
from kms.services.rotation import SCHEDULER
from tests.helpers import ManualClock
from tests.redis_server import RedisServer

SINGLE = ControlPolicy(SINGLE_OPERATOR)  # deletion is a dual-control change


def bus(url: str) -> RedisBus:
    """A bus with its own connection: another process, as far as Redis can tell."""
    return RedisBus(RedisConnection(url, 250))


def test_announcements_reach_every_other_process_once(redis_url: str) -> None:
    a, b = bus(redis_url), bus(redis_url)
    assert a.poll() == [] and b.poll() == []  # the first look only notes the position
    a.publish("credential", "KMSAAAA")
    a.publish(KEY, "k-1")
    assert b.poll() == [("credential", "KMSAAAA"), (KEY, "k-1")]
    assert b.poll() == []
    assert a.poll() == [("credential", "KMSAAAA"), (KEY, "k-1")]  # its own come back too


def test_a_process_that_did_not_look_for_long_drops_everything(redis_url: str) -> None:
    a = bus(redis_url)
    b = RedisBus(RedisConnection(redis_url, 250), keep_seconds=1)
    assert b.poll() == []
    a.publish(KEY, "seen")
    assert b.poll() == [(KEY, "seen")]
    a.publish(KEY, "maybe-trimmed")
    time.sleep(0.6)  # more than half the time announcements are kept
    assert b.poll() is None  # b cannot know what it missed: drop everything
    assert b.poll() == []


def test_a_redis_restart_drops_every_cached_entry(own_redis: RedisServer) -> None:
    seen: list[str | None] = []
    a = Invalidations(bus(own_redis.url), interval=0)
    a.subscribe("credential", seen.append)
    a.refresh()
    assert seen == []
    own_redis.stop()
    a.refresh()  # fails quietly; announcements made meanwhile may be lost
    a.publish("credential", "local")  # applied here, not announced (logged)
    assert seen == ["local"]
    own_redis.start()
    time.sleep(RETRY_SECONDS + 0.1)
    a.refresh()
    assert seen == ["local", None]  # None: drop everything
    other = bus(own_redis.url)
    other.poll()
    other.publish("credential", "after")
    a.refresh()
    assert seen == ["local", None, "after"]


def test_a_restart_without_a_failed_look_is_seen_through_the_epoch(
    own_redis: RedisServer,
) -> None:
    b = bus(own_redis.url)
    assert b.poll() == []
    own_redis.stop()
    own_redis.start()
    assert b.poll() is None  # Redis restarted empty while b was not looking


def test_the_lease_admits_one_holder_and_gives_way_when_redis_is_down(
    own_redis: RedisServer,
) -> None:
    a = RedisLeases(RedisConnection(own_redis.url, 250))
    b = RedisLeases(RedisConnection(own_redis.url, 250))
    with a.hold("scheduler", 60) as held:
        assert held
        with b.hold("scheduler", 60) as other:
            assert not other
    with b.hold("scheduler", 60) as held:  # given back at the end of the block
        assert held
    with a.hold("short", 1) as held:
        assert held
        time.sleep(1.1)
        with b.hold("short", 60) as other:
            assert other  # an expired lease is free (a crashed holder cannot block forever)
    own_redis.stop()
    with a.hold("scheduler", 60) as held:
        assert held  # only saves work: the scheduler still runs without Redis


def test_the_scheduler_pass_takes_the_lease_and_announces_destroyed_keys(
    storage: Any, hsm: Any, redis_url: str
) -> None:
    clock = ManualClock()
    options = Options(cluster=ClusterSettings(redis_url=redis_url), control=SINGLE)
    node, other = (build_services(storage, hsm, clock, options) for _ in range(2))
    seen: list[str | None] = []
    other.cluster.invalidations.subscribe(KEY, seen.append)
    other.cluster.invalidations.refresh()
    assert node.principals.bootstrap_admin("admin")  # the caller's row, read at each write
    with storage.reader() as tx:
        caller = Caller("t", tx.principal_by_name("admin"))
    key = node.keys.create(caller, "doomed", "")
    node.keys.schedule_deletion(caller, key.key_id, MIN_PENDING_DAYS)
    clock.advance(timedelta(days=MIN_PENDING_DAYS, hours=1).total_seconds())
    scheduler = Caller("s", SCHEDULER)
    holder = RedisLeases(RedisConnection(redis_url, 250))
    with holder.hold("scheduler", 60) as held:
        assert held
        assert node.cluster.scheduler_pass(node.keys, scheduler) is None  # another runs
    assert node.keys.get(caller, key.key_id).state is KeyState.PENDING_DELETION
    run = node.cluster.scheduler_pass(node.keys, scheduler)
    assert run is not None and run.destroyed == [key.key_id]
    assert node.keys.get(caller, key.key_id).state is KeyState.DESTROYED
    time.sleep(1.05)  # the other node looks at most once per POLL_SECONDS
    other.cluster.invalidations.refresh()
    assert seen == [key.key_id]
