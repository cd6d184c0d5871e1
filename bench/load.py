"""Sustained mixed load for a bounded time (`make bench`; docs/performance.md): throughput,
p50/p99 latency, errors, peak RSS of each gunicorn worker and how fast the audit chain
grows, in three set-ups started by this script and stopped at the end:

1. 1 node x 2 workers on SQLite (the single-machine default, synchronous=FULL);
2. 1 node x 2 workers on PostgreSQL + Redis;
3. 2 nodes x 2 workers (two gunicorn masters, one SoftHSM token directory) on the same
   PostgreSQL + Redis, the load split evenly between them as a balancer would.

    .venv/bin/python bench/load.py --seconds 15 --connections 8

The load is bearer-token native API traffic from wrk (closed loop, one wrk process per
node, ``--connections`` in all) cycling over a shuffled mix of 4 decrypt : 2 datakey :
1 encrypt : 1 rewrap over 8 keys and 256 sealed data keys; p50/p99 come from the merged
latency histograms of the wrk processes. Errors are connection/read/timeout errors plus
non-2xx answers. PostgreSQL is a throwaway cluster (tests/pg.py) switched back to a
durable configuration (fsync, full_page_writes; synchronous_commit stays on), so both
databases commit each audit record to disk before answering. Redis carries the rate
limits (raised far above the offered load so nothing is refused) and cache invalidation.
The audit growth is the audit table's size (SQLite: its pages and its indexes' pages from
``dbstat``; PostgreSQL: ``pg_total_relation_size``) and the chain head's sequence number
before and after the load. Peak RSS is ``VmHWM`` of each worker (a child of its gunicorn
master) read after the load.

Everything (wrk, gunicorn, PostgreSQL, Redis) shares this machine's cores: two nodes on
one machine show the cost of sharing the database and Redis, not scale-out. Results go to
bench/results/load.json. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kms.client import KmsClient  # noqa: E402
from tests.helpers import Server, gunicorn_server, init_data_dir, run_kms  # noqa: E402
from tests.pg import PgCluster  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
KEYS = 8
BLOBS = 256
MIX = {"decrypt": 4, "datakey": 2, "encrypt": 1, "rewrap": 1}
# measure, never throttle
ENV = {"KMS_RATE_LIMITS": "service=1000000/second", "KMS_AUDIT_BUDGET": "service=none"}

WRK_SCRIPT = """
local paths, bodies, n = {}, {}, 0
for line in io.lines("%(lines)s") do
  local tab = line:find("\\t", 1, true)
  n = n + 1
  paths[n] = line:sub(1, tab - 1)
  bodies[n] = line:sub(tab + 1)
end
local i = %(offset)d
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
request = function()
  i = (i %% n) + 1
  return wrk.format(nil, paths[i], nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.duration, e.connect, e.read, e.write, e.timeout, e.status))
  for k = 1, #latency do
    local value, count = latency(k)
    io.write(string.format("H %%d %%d\\n", value, count))
  end
end
"""

AuditMeter = Callable[[], tuple[int, int]]  # -> (chain head seq, audit table bytes)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def seed(server: Server) -> tuple[str, list[str]]:
    """A service principal granted on KEYS keys, BLOBS sealed data keys; its token and
    the mixed request lines (``path<TAB>json body``), shuffled."""
    admin = KmsClient(server.url, server.admin_token, timeout=60)
    svc = admin.create_principal("load", "service")
    aliases = [f"load-{k}" for k in range(KEYS)]
    for alias in aliases:
        admin.create_key(alias)
        admin.grant(alias, "load", ["datakey", "encrypt", "decrypt", "rewrap"])
    app = KmsClient(server.url, svc["token"], timeout=60)
    lines: list[str] = []
    for i in range(BLOBS):
        key, other, ctx = aliases[i % KEYS], aliases[(i + 1) % KEYS], {"row": str(i)}
        blob = b64(app.datakey(key, ctx).ciphertext)
        made = {
            "decrypt": ("/v1/decrypt", {"ciphertext": blob, "context": ctx}),
            "datakey": (f"/v1/keys/{key}/datakey", {"context": ctx}),
            "encrypt": (
                f"/v1/keys/{key}/encrypt",
                {"plaintext": b64(os.urandom(64)), "context": ctx},
            ),
            "rewrap": (
                "/v1/rewrap",
                {"ciphertext": blob, "context": ctx, "destination_key": other},
            ),
        }
        for op, weight in MIX.items():
            path, body = made[op]
            lines += [f"{path}\t{json.dumps(body)}"] * weight
    random.Random(7).shuffle(lines)
    return str(svc["token"]), lines


def run_wrk_mixed(
    servers: list[Server], token: str, lines: list[str], seconds: float, conns: int, work: Path
) -> dict[str, Any]:
    """One wrk process per server at once (``conns`` connections split among them); the
    merged totals and latency histogram."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "lines.txt").write_text("\n".join(lines) + "\n")
    procs = []
    for n, server in enumerate(servers):
        script = work / f"mixed-{n}.lua"
        offset = n * len(lines) // len(servers)
        script.write_text(
            WRK_SCRIPT % {"lines": work / "lines.txt", "token": token, "offset": offset}
        )
        cmd = ["wrk", "-t1", f"-c{max(1, conns // len(servers))}", f"-d{max(1, int(seconds))}s"]
        cmd += ["--timeout", "10s", "-s", str(script), server.url]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=seconds + 120)[0] for p in procs]
    total: Counter[str] = Counter()
    histogram: Counter[int] = Counter()
    duration = 0.0
    for out in outputs:
        m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
        assert m, out
        requests, micros, *errors = map(int, m.groups())
        total["requests"] += requests
        total["errors"] += sum(errors)
        total["non_2xx"] += errors[-1]
        duration = max(duration, micros / 1e6)
        for value, count in re.findall(r"^H (\d+) (\d+)$", out, re.MULTILINE):
            histogram[int(value)] += int(count)
    return {
        "requests": total["requests"],
        "seconds": duration,
        "rps": total["requests"] / duration,
        "p50_ms": percentile(histogram, 50) / 1000,
        "p99_ms": percentile(histogram, 99) / 1000,
        "max_ms": max(histogram, default=0) / 1000,
        "errors": total["errors"],
        "non_2xx": total["non_2xx"],
    }


def percentile(histogram: Counter[int], p: float) -> float:
    """The smallest value (µs) with at least ``p`` percent of the samples at or below it."""
    total, seen = sum(histogram.values()), 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= total * p / 100:
            return float(value)
    return float("nan")


def worker_pids(master: int) -> list[int]:
    """The processes whose parent is ``master`` (gunicorn's workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == master:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def peak_rss_mib(pid: int) -> float:
    """VmHWM (the peak resident set size) of ``pid``, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sqlite_meter(db: Path) -> AuditMeter:
    def measure() -> tuple[int, int]:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            (seq,) = conn.execute("SELECT seq FROM audit_head").fetchone()
            (size,) = conn.execute(
                "SELECT sum(pgsize) FROM dbstat WHERE name IN "
                "(SELECT name FROM sqlite_master WHERE tbl_name = 'audit_records')"
            ).fetchone()
        conn.close()
        return int(seq), int(size)

    return measure


def pg_meter(cluster: PgCluster, database: str) -> AuditMeter:
    def measure() -> tuple[int, int]:
        ((seq, size),) = cluster.execute(
            "SELECT (SELECT seq FROM audit_head), pg_total_relation_size('audit_records')",
            database=database,
        )
        return int(seq), int(size)

    return measure


def measure(
    name: str, servers: list[Server], meter: AuditMeter, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """Seed through the first server, load all of them, read the audit growth and RSS."""
    token, lines = seed(servers[0])
    seq0, size0 = meter()
    load = run_wrk_mixed(servers, token, lines, args.seconds, args.connections, work / name)
    seq1, size1 = meter()
    records = seq1 - seq0
    return {
        **load,
        "nodes": len(servers),
        "audit_records_per_s": records / load["seconds"],
        "audit_bytes_per_s": (size1 - size0) / load["seconds"],
        "audit_bytes_per_record": (size1 - size0) / max(1, records),
        "audit_records": records,
        "peak_rss_mib": [
            [round(peak_rss_mib(pid), 1) for pid in worker_pids(s.proc.pid)] for s in servers
        ],
    }


@contextmanager
def postgres_and_redis(work: Path) -> Iterator[tuple[PgCluster, RedisServer]]:
    """A durable throwaway PostgreSQL cluster and a redis-server, stopped at the end."""
    cluster = PgCluster.create()
    try:
        cluster.execute(
            "ALTER SYSTEM SET fsync = on",
            "ALTER SYSTEM SET full_page_writes = on",
            "SELECT pg_reload_conf()",
        )
        redis_dir = work / "redis"
        redis_dir.mkdir()
        redis = RedisServer(redis_dir)
        redis.start()
        try:
            redis.flush()
            yield cluster, redis
        finally:
            redis.stop()
    finally:
        cluster.destroy()


def pg_data_dir(path: Path, cluster: PgCluster, database: str) -> Path:
    cluster.create_database(database)
    done = run_kms(
        "init",
        "--data-dir",
        str(path),
        "--database-url",
        cluster.url(database),
        "--single-operator",
    )
    if done.returncode != 0:
        raise SystemExit(f"kms init failed: {done.stderr}")
    return path


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    scenarios: dict[str, Any] = {}
    name = "1 node x 2 workers, SQLite"
    data = init_data_dir(work / "sqlite")
    print(f"{name} ...", flush=True)
    with gunicorn_server(data, 2, ENV) as server:
        meter = sqlite_meter(data / "kms.sqlite3")
        scenarios[name] = measure("sqlite", [server], meter, args, work)
    with postgres_and_redis(work) as (cluster, redis):
        env = {**ENV, "KMS_REDIS_URL": redis.url}
        for nodes in (1, 2):
            name = f"{nodes} node{'s' if nodes > 1 else ''} x 2 workers, PostgreSQL + Redis"
            print(f"{name} ...", flush=True)
            database = f"kms_load_{nodes}"
            data = pg_data_dir(work / database, cluster, database)
            with ExitStack() as stack:
                servers = [stack.enter_context(gunicorn_server(data, 2, env)) for _ in range(nodes)]
                meter = pg_meter(cluster, database)
                scenarios[name] = measure(database, servers, meter, args, work)
    return scenarios


def report(results: dict[str, Any]) -> None:
    print(
        f"\n{'scenario':<40}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'errors':>8}"
        f"{'audit rec/s':>12}{'audit KiB/s':>12}{'B/rec':>7}  peak RSS per worker, MiB"
    )
    for name, r in results["scenarios"].items():
        rss = " | ".join(", ".join(f"{m:.0f}" for m in node) for node in r["peak_rss_mib"])
        print(
            f"{name:<40}{r['rps']:>8.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
            f"{r['errors']:>8d}{r['audit_records_per_s']:>12.0f}"
            f"{r['audit_bytes_per_s'] / 1024:>12.0f}{r['audit_bytes_per_record']:>7.0f}  {rss}"
        )
    mix = ", ".join(f"{w} {op}" for op, w in MIX.items())
    print(
        f"\n{results['seconds']:.0f} s per scenario, {results['connections']} connections, "
        f"mix {mix}, {results['cores']} cores shared by load, servers and databases"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per scenario")
    parser.add_argument("--connections", type=int, default=8, help="in all, split by node")
    args = parser.parse_args()
    started = time.monotonic()
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kms-load-") as tmp:
        work = Path(tmp)
        scenarios = run(args, work)
    results = {
        "scenarios": scenarios,
        "seconds": args.seconds,
        "connections": args.connections,
        "mix": MIX,
        "cores": os.cpu_count(),
    }
    report(results)
    (RESULTS / "load.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS / 'load.json'} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
