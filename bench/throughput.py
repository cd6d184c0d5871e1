"""Decrypt and datakey requests/second through gunicorn (2 workers), beside the raw SoftHSM
AES-256-GCM rate of the same number of processes, measured in the same run.

    make bench            # or: .venv/bin/python bench/throughput.py --seconds 10

The load generator is wrk (Debian package), a separate process on the same 2-core
machine, so the server and the generator share the CPU: read the ratios, not the
absolute numbers. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kms.client import KmsClient  # noqa: E402
from tests.helpers import gunicorn_server, init_data_dir  # noqa: E402

WRK_SCRIPT = """
local bodies = {}
local n = 0
for line in io.lines("%(bodies)s") do n = n + 1; bodies[n] = line end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
request = function()
  i = (i %% n) + 1
  return wrk.format(nil, "%(path)s", nil, bodies[i])
end
"""


def raw_hsm_worker(data_dir: str, seconds: float, op: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One process: python-pkcs11 AES-256-GCM on an unwrapped session KEK, cached handle."""
    import pkcs11
    from pkcs11 import GCMParams, KeyType, Mechanism, ObjectClass

    from hsm_config import templates
    from kms import config

    settings = config.from_env({"KMS_DATA_DIR": data_dir})
    os.environ["SOFTHSM2_CONF"] = settings.softhsm2_conf or ""
    lib = pkcs11.lib(settings.pkcs11_module)
    for attempt in range(10):
        try:
            session = lib.get_token(token_label=settings.token_label).open(user_pin=settings.pin)
            break
        except pkcs11.exceptions.PKCS11Error:
            lib.finalize()
            lib.initialize()
            time.sleep(0.05 * (attempt + 1))
    root = session.get_key(object_class=ObjectClass.SECRET_KEY, label=settings.root_key_label)
    tmp = session.generate_key(KeyType.AES, 256, store=False, template=templates.KEK_TO_WRAP)
    wrapped = root.wrap_key(tmp, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    kek = root.unwrap_key(
        ObjectClass.SECRET_KEY,
        KeyType.AES,
        wrapped,
        mechanism=Mechanism.AES_KEY_WRAP_PAD,
        store=False,
        template=templates.KEK_IN_USE,
    )
    aad, dek = b"a" * 60, os.urandom(32)
    iv = os.urandom(12)
    ct = kek.encrypt(dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad))
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(100):
            if op == "encrypt":
                kek.encrypt(
                    dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(os.urandom(12), aad)
                )
            else:
                kek.decrypt(ct, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad))
        count += 100
    out.put(count / seconds)


def raw_hsm_rate(data_dir: Path, procs: int, seconds: float, op: str) -> float:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [
        ctx.Process(target=raw_hsm_worker, args=(str(data_dir), seconds, op, queue))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    rates = [queue.get(timeout=seconds + 60) for _ in workers]
    for w in workers:
        w.join()
    return sum(rates)


def run_wrk(
    url: str, path: str, token: str, bodies: list[str], seconds: int, conns: int, workdir: Path
) -> dict[str, float]:
    body_file = workdir / f"bodies-{path.replace('/', '_')}.txt"
    body_file.write_text("\n".join(bodies) + "\n")
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT % {"bodies": body_file, "token": token, "path": path})
    done = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    out = done.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if m:
            lat[pct] = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return {
        "rps": rps,
        "p50_ms": lat.get("50", float("nan")),
        "p99_ms": lat.get("99", float("nan")),
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--sqlite-synchronous", default="FULL", choices=["FULL", "NORMAL"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (make bench installs the Debian package)")

    with tempfile.TemporaryDirectory(prefix="kms-bench-") as tmp:
        work = Path(tmp)
        data = init_data_dir(work / "data")
        raw_enc = raw_hsm_rate(data, args.workers, args.seconds / 2, "encrypt")
        raw_dec = raw_hsm_rate(data, args.workers, args.seconds / 2, "decrypt")
        env = {"KMS_SQLITE_SYNCHRONOUS": args.sqlite_synchronous, "KMS_LOG_LEVEL": "WARNING"}
        with gunicorn_server(data, workers=args.workers, env=env) as srv:
            admin = KmsClient(srv.url, srv.admin_token)
            svc = admin.create_principal("bench", "service")
            admin.create_key("bench")
            admin.grant("bench", "bench", ["datakey", "decrypt"])
            app = KmsClient(srv.url, svc["token"])
            blobs = [app.datakey("bench", {"row": str(i)}).ciphertext for i in range(200)]
            dec_bodies = [
                json.dumps({"ciphertext": base64.b64encode(b).decode(), "context": {"row": str(i)}})
                for i, b in enumerate(blobs)
            ]
            results = {
                "decrypt": run_wrk(
                    srv.url,
                    "/v1/decrypt",
                    svc["token"],
                    dec_bodies,
                    args.seconds,
                    args.connections,
                    work,
                ),
                "datakey": run_wrk(
                    srv.url,
                    "/v1/keys/bench/datakey",
                    svc["token"],
                    ['{"context": {"row": "1"}}'],
                    args.seconds,
                    args.connections,
                    work,
                ),
            }
    print(
        f"\nmachine: {os.cpu_count()} cores; {args.workers} gunicorn workers; wrk "
        f"{args.connections} connections, {args.seconds}s per scenario; "
        f"SQLite synchronous={args.sqlite_synchronous}"
    )
    print(f"{'scenario':<34}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'vs raw HSM':>12}")
    print(f"{'raw SoftHSM GCM encrypt (' + str(args.workers) + ' procs)':<34}{raw_enc:>10.0f}")
    print(f"{'raw SoftHSM GCM decrypt (' + str(args.workers) + ' procs)':<34}{raw_dec:>10.0f}")
    for name, base in (("decrypt", raw_dec), ("datakey", raw_enc)):
        r = results[name]
        print(
            f"{'KMS ' + name + ' (HTTP, audited)':<34}{r['rps']:>10.0f}{r['p50_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['errors']:>8.0f}{r['rps'] / base:>11.1%}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"raw_encrypt": raw_enc, "raw_decrypt": raw_dec, **results}, indent=2)
        )


if __name__ == "__main__":
    main()
