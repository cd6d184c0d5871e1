"""The cost of checking a row's HSM seal on the hot path (kms/services/seals.py), beside
what a decrypt already pays the HSM, measured in the same run:

- a key row checked the first time a worker reads it (one HMAC in SoftHSM);
- the same row checked again (the worker's memo: JSON encoding and a dictionary look-up);
- baseline: one AES-256-GCM decrypt of a 32-byte DEK under a KEK the worker holds (the
  crypto of one decrypt request);
- freshness (kms/services/state_index.py): the read of the HSM state anchor each
  transaction makes before its first sealed row, and a transaction that changes a sealed
  row (a key's description) beside one that changes nothing sealed, where the
  difference is the state log and the anchor moved in the HSM;
- the principal lifecycle (kms/services/principals.py): authenticating a remembered
  token, which follows the state anchor so that a disable reaches every worker at once,
  beside the same look-up without following it (what it cost before); and the re-read
  of the caller's principal that every write transaction makes.

    .venv/bin/python bench/seals.py --rows 2000

In-process, one thread. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kms import config  # noqa: E402
from kms.app import hsm_config  # noqa: E402
from kms.backends.hsm import Pkcs11Hsm  # noqa: E402
from kms.backends.storage import SqlStorage, make_engine  # noqa: E402
from kms.services.audit import AuditTrail  # noqa: E402
from kms.services.audit_events import Caller  # noqa: E402
from kms.services.change_model import SINGLE_OPERATOR, ControlPolicy  # noqa: E402
from kms.services.changes import ChangeService  # noqa: E402
from kms.services.clock import SystemClock  # noqa: E402
from kms.services.escrow_common import EscrowRows, EscrowSettings  # noqa: E402
from kms.services.model import KekRef, Key, KeyState, Principal  # noqa: E402
from kms.services.notify import Notifier, WebhookSettings  # noqa: E402
from kms.services.principals import PrincipalService  # noqa: E402
from kms.services.seals import RowSeals, key_fields  # noqa: E402
from tests.helpers import init_data_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kms-bench-seals-") as tmp:
        settings = config.from_env({"KMS_DATA_DIR": str(init_data_dir(Path(tmp) / "data"))})
        hsm = Pkcs11Hsm(hsm_config(settings))
        seals = RowSeals(hsm)
        now = datetime.now(UTC)
        rows = []
        for i in range(args.rows):
            key = Key(f"key-{i:08d}", None, "", KeyState.ENABLED, 1, now, None, None, None, 1, now)
            rows.append((key_fields(key), seals.seal("key", key_fields(key))))
        first = _per_op(lambda: [seals.check("key", f, s) for f, s in rows], len(rows))
        again = _per_op(lambda: [seals.check("key", f, s) for f, s in rows], len(rows))
        wrapped = hsm.new_wrapped_kek()
        kek = KekRef("bench", 1, wrapped.wrapped, wrapped.root_label)
        iv, aad = os.urandom(12), b"aad"
        sealed = hsm.encrypt(kek, iv, os.urandom(32), aad)
        decrypt = _per_op(lambda: [hsm.decrypt(kek, iv, sealed, aad) for _ in rows], len(rows))
        anchor_read, sealed_tx, plain_tx = _freshness(settings, hsm, rows[0][0]["key_id"], now)
        auth_follow, auth_still, reread = _lifecycle(settings, hsm)
        hsm.close()
    print(f"\n{'operation':<50}{'us':>8}{'x decrypt':>11}")
    for name, cost in (
        ("seal check, first read of a row (HSM HMAC)", first),
        ("seal check, row read again (memo)", again),
        ("baseline: AES-GCM decrypt of a DEK in the HSM", decrypt),
        ("freshness: state anchor read, per transaction", anchor_read),
        ("transaction changing a sealed row (key)", sealed_tx),
        ("transaction changing no sealed row (nonce)", plain_tx),
        ("authenticate a remembered token, anchor followed", auth_follow),
        ("authenticate a remembered token, not followed", auth_still),
        ("caller's principal re-read in a transaction", reread),
    ):
        print(f"{name:<50}{cost * 1e6:>8.1f}{cost / decrypt:>11.2f}")


def _freshness(
    settings: config.Settings, hsm: Pkcs11Hsm, key_id: str, now: datetime
) -> tuple[float, float, float]:
    """Seconds per anchor read, per transaction writing a sealed row, per one that
    writes none, on the data directory's own database."""
    storage = SqlStorage(make_engine(settings.database_url, "NORMAL"), RowSeals(hsm))
    state = storage._seals.state  # type: ignore[attr-defined]
    state.sync()
    key = Key(key_id, None, "", KeyState.ENABLED, 1, now, None, None, None, 1, now)
    with storage.transaction() as tx:
        tx.add_key(key)
    n = 200
    read = _per_op(lambda: [state.sync() for _ in range(n)], n)

    def sealed_writes() -> None:
        for i in range(n):
            with storage.transaction() as tx:
                tx.update_key(replace(key, description=str(i)))

    def plain_writes() -> None:
        for i in range(n):
            with storage.transaction() as tx:
                tx.remember_nonce(f"bench-{i}", "9999-12-31T00:00:00.000Z", "2000")

    return read, _per_op(sealed_writes, n), _per_op(plain_writes, n)


def _lifecycle(settings: config.Settings, hsm: Pkcs11Hsm) -> tuple[float, float, float]:
    """Seconds per authentication of a remembered token following the anchor, per one
    that does not (a constant version: the cost before), per principal re-read."""
    storage = SqlStorage(make_engine(settings.database_url, "NORMAL"), RowSeals(hsm))
    state = storage._seals.state  # type: ignore[attr-defined]
    trail = AuditTrail(storage, SystemClock(), hsm)
    notifier = Notifier(storage, trail, SystemClock(), None, WebhookSettings())
    rows, single = EscrowRows(RowSeals(hsm)), ControlPolicy(SINGLE_OPERATOR)
    changes = ChangeService(storage, trail, SystemClock(), notifier, rows, single, EscrowSettings())
    follow = PrincipalService(storage, trail, SystemClock(), 300, state.version, changes=changes)
    still = PrincipalService(storage, trail, SystemClock(), 300, lambda: 1, changes=changes)
    token = follow.create(Caller("bench", _admin(storage)), "bench-svc", "service")[1]
    n = 2000
    for service in (follow, still):
        service.authenticate(token)  # remembered from now on
    timed = [
        _per_op(lambda s=s: [s.authenticate(token) for _ in range(n)], n) for s in (follow, still)
    ]

    def rereads() -> None:
        with storage.reader() as tx:
            for _ in range(n):
                tx.principal_by_name("bench-svc")

    return timed[0], timed[1], _per_op(rereads, n)


def _admin(storage: SqlStorage) -> Principal:
    with storage.reader() as tx:
        admin = tx.principal_by_name("admin")
    assert admin is not None
    return admin


def _per_op(run: Callable[[], object], n: int) -> float:
    """Seconds per operation of ``run`` (which does ``n`` of them)."""
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / n


if __name__ == "__main__":
    main()
