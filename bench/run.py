"""The benchmark suite (`make bench`): every scenario in one run on this machine, beside
the two physical limits measured in the same run.

- ceiling: a bare Flask JSON endpoint under the same gunicorn settings (2 sync workers);
- floor: the least work a single and a 1000-item batch decrypt with durable audit records
  can do on this stack (bench/floor_app.py): what the KMS can reach here at best;
- physical limit: raw SoftHSM AES-256-GCM operations/s through python-pkcs11 in 2 processes;
- KMS single decrypt, datakey, encrypt, rewrap (requests/s, p50/p99/p99.9);
- KMS batch decrypt and datakey with 100 and 1000 items (items/s);
- decrypt over 5,000 of 100,000 keys (per-worker KEK cache misses), with cache counters;
- p99 of single decrypt at 50% of its peak rate (open-loop, fixed arrival rate);
- the same single decrypt with power-loss durability (SQLite synchronous=FULL).

Load comes from wrk (closed loop, 8 connections) or an open-loop Python generator, both
separate processes on the same 2 cores as the server: read ratios, not absolute numbers.
Results go to bench/results/latest.json and bench/results/latest.png. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    UNTHROTTLED_BUDGET,
    bare_flask_server,
    floor_rates,
    open_loop,
    raw_hsm_rate,
    run_wrk,
    seed_keys,
)
from kms.client import KmsClient  # noqa: E402
from tests.helpers import gunicorn_server, init_data_dir  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def kms_scenarios(data: Path, seconds: float, sync: str, work: Path) -> dict[str, Any]:
    env = {
        "KMS_SQLITE_SYNCHRONOUS": sync,
        "KMS_LOG_LEVEL": "WARNING",
        "KMS_AUDIT_CHECKPOINT_SECONDS": "0",
        "KMS_AUDIT_BUDGET": UNTHROTTLED_BUDGET,
        "KMS_RATE_LIMITS": "service=none",
    }
    out: dict[str, Any] = {}
    with gunicorn_server(data, workers=2, env=env) as srv:
        admin = KmsClient(srv.url, srv.admin_token)
        svc = admin.create_principal(f"bench-{sync.lower()}", "service")
        token = svc["token"]
        if not any(k["alias"] == "bench" for k in admin.list_keys()):
            admin.create_key("bench")
        admin.grant("bench", svc["name"], ["datakey", "encrypt", "decrypt", "rewrap"])
        app = KmsClient(srv.url, token)
        blobs = [
            (app.datakey("bench", {"row": str(i)}).ciphertext, {"row": str(i)}) for i in range(200)
        ]
        dec = [json.dumps({"ciphertext": b64(b), "context": c}) for b, c in blobs]

        def wrk(name: str, path: str, bodies: list[str], conns: int = 8) -> dict[str, Any]:
            return run_wrk(srv.url, path, token, bodies, seconds, conns, work / name)

        out["decrypt"] = wrk("decrypt", "/v1/decrypt", dec)
        if sync == "FULL":
            return out
        out["datakey"] = wrk("datakey", "/v1/keys/bench/datakey", ['{"context": {"row": "1"}}'])
        out["encrypt"] = wrk(
            "encrypt", "/v1/keys/bench/encrypt", [json.dumps({"plaintext": b64(os.urandom(64))})]
        )
        out["rewrap"] = wrk("rewrap", "/v1/rewrap", dec)
        for n in (100, 1000):
            items = [json.loads(dec[i % len(dec)]) for i in range(n)]
            r = wrk(f"batch-decrypt-{n}", "/v1/decrypt", [json.dumps({"items": items})], 2)
            out[f"batch decrypt {n}"] = {**r, "items_per_s": r["rps"] * n}
            body = json.dumps({"items": [{"context": {"row": "1"}}] * n})
            r = wrk(f"batch-datakey-{n}", "/v1/keys/bench/datakey", [body], 2)
            out[f"batch datakey {n}"] = {**r, "items_per_s": r["rps"] * n}
        rate = out["decrypt"]["rps"] * 0.5
        out["decrypt at 50% load"] = open_loop(srv.url + "/v1/decrypt", token, dec, rate, seconds)
    return out


def many_keys_scenario(data: Path, seconds: float, work: Path) -> dict[str, Any]:
    token, blobs = seed_keys(data, total=100_000, used=5_000)
    env = {
        "KMS_SQLITE_SYNCHRONOUS": "NORMAL",
        "KMS_LOG_LEVEL": "WARNING",
        "KMS_AUDIT_CHECKPOINT_SECONDS": "0",
        "KMS_AUDIT_BUDGET": UNTHROTTLED_BUDGET,
        "KMS_RATE_LIMITS": "service=none",
    }
    random.shuffle(blobs)
    bodies = [json.dumps({"ciphertext": b64(b)}) for b in blobs]
    with gunicorn_server(data, workers=2, env=env) as srv:
        result = run_wrk(srv.url, "/v1/decrypt", token, bodies, seconds, 8, work / "many")
    stats = [
        json.loads(line)
        for line in srv.log_text().splitlines()
        if line.startswith("{") and '"worker stats"' in line
    ]
    hits = sum(s["kek_cache_hits"] for s in stats)
    misses = sum(s["kek_cache_misses"] for s in stats)
    return {**result, "workers": stats, "kek_hit_rate": hits / max(1, hits + misses)}


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, v) for k, v in results["scenarios"].items() if "rps" in v]
    names = [k for k, _ in rows]
    throughput = [v.get("items_per_s", v["rps"]) for _, v in rows]
    p99 = [v["p99_ms"] for _, v in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    a.bar(names, throughput, color="#3b6ea5")
    a.set_yscale("log")
    a.set_ylabel("operations (items) / s, log")
    a.axhline(results["ceiling"]["rps"], color="grey", ls="--", label="bare Flask ceiling")
    a.axhline(results["floor"]["decrypt"]["rps"], color="#5a9e6f", ls="-.", label="floor: decrypt")
    a.axhline(
        results["floor"]["batch decrypt 1000"]["items_per_s"],
        color="#5a9e6f",
        ls=":",
        label="floor: batch decrypt items",
    )
    a.axhline(results["raw_hsm"]["decrypt"], color="#b5523b", ls=":", label="raw SoftHSM decrypt")
    a.legend()
    b.bar(names, p99, color="#8a6fb0")
    b.set_ylabel("p99 latency, ms")
    b.tick_params(axis="x", rotation=35)
    fig.suptitle(
        f"Keyholder KMS on {os.cpu_count()} cores, 2 gunicorn workers ({time.strftime('%Y-%m-%d')})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    started = time.monotonic()
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kms-bench-") as tmp:
        work = Path(tmp)
        ceiling = bare_flask_server_rate(args.seconds, work)
        data = init_data_dir(work / "data")
        raw = {op: raw_hsm_rate(data, 2, args.seconds, op) for op in ("encrypt", "decrypt")}
        floor = floor_rates(data, args.seconds, work)
        scenarios = kms_scenarios(data, args.seconds, "NORMAL", work)
        full = kms_scenarios(data, args.seconds, "FULL", work)["decrypt"]
        scenarios["decrypt (synchronous=FULL)"] = full
        many = many_keys_scenario(init_data_dir(work / "many"), args.seconds, work)
        scenarios["decrypt over 100k keys"] = many
    results = {
        "ceiling": ceiling,
        "raw_hsm": raw,
        "floor": floor,
        "scenarios": scenarios,
        "seconds": args.seconds,
        "cores": os.cpu_count(),
    }
    report(results)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    chart(results, RESULTS / "latest.png")
    print(
        f"\nwrote {RESULTS / 'latest.json'} and {RESULTS / 'latest.png'} "
        f"in {time.monotonic() - started:.0f} s"
    )


def bare_flask_server_rate(seconds: float, work: Path) -> dict[str, Any]:
    with bare_flask_server() as url:
        return run_wrk(url, "/echo", "x", ['{"ciphertext": "AAAA"}'], seconds, 8, work / "bare")


def report(results: dict[str, Any]) -> None:
    ceiling = results["ceiling"]["rps"]
    raw = results["raw_hsm"]
    print(
        f"\n{'scenario':<30}{'req/s':>9}{'items/s':>10}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'p99.9':>8}{'err':>5}{'ratio':>22}"
    )
    print(f"{'bare Flask ceiling':<30}{ceiling:>9.0f}")
    print(f"{'raw SoftHSM encrypt, 2 procs':<30}{'':>9}{raw['encrypt']:>10.0f}")
    print(f"{'raw SoftHSM decrypt, 2 procs':<30}{'':>9}{raw['decrypt']:>10.0f}")
    floor = {f"floor: {k}": v for k, v in results["floor"].items()}
    for name, r in {**floor, **results["scenarios"]}.items():
        items = r.get("items_per_s")
        if items:
            ratio = f"{items / raw['decrypt' if 'decrypt' in name else 'encrypt']:.1%} of raw HSM"
        elif "rps" in r:
            ratio = f"{r['rps'] / ceiling:.1%} of ceiling"
        else:
            ratio = f"at {r['target_rps']:.0f} req/s"
        print(
            f"{name:<30}{r.get('rps', r.get('achieved_rps', 0)):>9.0f}"
            f"{(items or 0):>10.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
            f"{r.get('p999_ms', float('nan')):>8.2f}{r.get('errors', 0):>5.0f}{ratio:>22}"
        )
    many = results["scenarios"]["decrypt over 100k keys"]
    print(
        f"\nKEK cache over 100k keys: hit rate {many['kek_hit_rate']:.1%} "
        f"(per worker: {[(w['kek_cache_hits'], w['kek_cache_misses']) for w in many['workers']]})"
    )
    single = results["scenarios"]["decrypt"]["rps"] / ceiling
    batch = results["scenarios"]["batch decrypt 1000"]["items_per_s"] / raw["decrypt"]
    p99 = results["scenarios"]["decrypt at 50% load"]["p99_ms"]
    floor_single = results["floor"]["decrypt"]["rps"] / ceiling
    floor_batch = results["floor"]["batch decrypt 1000"]["items_per_s"] / raw["decrypt"]
    print(f"\n{'targets:':<42}{'KMS':>10}{'floor':>8}")
    for label, shown, bound, met in (
        ("single decrypt >= 60% of ceiling", f"{single:.1%}", f"{floor_single:.1%}", single >= 0.6),
        (
            "batch 1000 decrypt >= 50% of raw HSM",
            f"{batch:.1%}",
            f"{floor_batch:.1%}",
            batch >= 0.5,
        ),
        ("p99 single decrypt at 50% load < 10 ms", f"{p99:.2f} ms", "", p99 < 10),
    ):
        print(f"  {label:<40}{shown:>10}{bound:>8}  {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
