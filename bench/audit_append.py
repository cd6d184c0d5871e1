"""Audit records appended per second (hash-chained, checkpoint signed by SoftHSM every
1000 records), beside a bare SQLite insert of the same rows measured in the same run.

    .venv/bin/python bench/audit_append.py --seconds 5

In-process, one writer. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kms import config  # noqa: E402
from kms.app import hsm_config  # noqa: E402
from kms.backends.hsm import Pkcs11Hsm  # noqa: E402
from kms.backends.storage import SqlStorage, make_engine, upgrade  # noqa: E402
from kms.services.audit import AuditTrail, CheckpointPolicy  # noqa: E402
from kms.services.clock import SystemClock  # noqa: E402
from kms.services.model import AuditEvent  # noqa: E402
from tests.helpers import init_data_dir  # noqa: E402

EVENT = AuditEvent(
    request_id="0" * 32,
    principal="bench",
    operation="decrypt",
    key_id="k" * 36,
    key_version=1,
    context_sha256="c" * 64,
    justification="service_processing",
)


def kms_rate(trail: AuditTrail, batch: int, seconds: float) -> float:
    n, end = 0, time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < end:
        trail.record([EVENT] * batch)
        n += batch
    return n / (time.perf_counter() - start)


def sqlite_rate(path: Path, sync: str, batch: int, seconds: float) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={sync}")
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, body TEXT, hash TEXT)")
    row = ("x" * 300, "h" * 64)
    n, end = 0, time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < end:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO t (body, hash) VALUES (?, ?)", [row] * batch)
        db.execute("COMMIT")
        n += batch
    db.close()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kms-bench-audit-") as tmp:
        work = Path(tmp)
        settings = config.from_env({"KMS_DATA_DIR": str(init_data_dir(work / "data"))})
        hsm = Pkcs11Hsm(hsm_config(settings))
        rows = []
        for sync in ("FULL", "NORMAL"):
            for batch in (1, 100):
                engine = make_engine(f"sqlite:///{work}/a-{sync}-{batch}.sqlite3", sync)
                upgrade(engine)
                trail = AuditTrail(SqlStorage(engine), SystemClock(), hsm, CheckpointPolicy(1000))
                trail.anchor_new_chain(allow_other_chains=True)  # as kms init would
                kms = kms_rate(trail, batch, args.seconds)
                base = sqlite_rate(work / f"b-{sync}-{batch}.sqlite3", sync, batch, args.seconds)
                rows.append((sync, batch, kms, base))
                engine.dispose()
        hsm.close()
    print(
        f"\n{'synchronous':<12}{'batch':>6}{'KMS records/s':>16}"
        f"{'bare SQLite rows/s':>20}{'ratio':>8}"
    )
    for sync, batch, kms, base in rows:
        print(f"{sync:<12}{batch:>6}{kms:>16.0f}{base:>20.0f}{kms / base:>8.1%}")


if __name__ == "__main__":
    main()
