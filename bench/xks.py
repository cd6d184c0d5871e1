"""XKS decrypt and native decrypt throughput and latency against a live gunicorn server (2
workers), beside the bare-Flask ceiling, all measured in the same run with the same load
generator.

    .venv/bin/python bench/xks.py --seconds 10 --clients 4 [--presign]

The load generator is a pool of separate processes, each a closed loop on its own
connection; latency is measured from just before sending to the end of the response.
XKS: every request is signed freshly with botocore's SigV4 signer (the server refuses a
replayed signature; signing is excluded from the latency, not from the client's CPU).
Native: ``POST /v1/decrypt`` with a bearer token, cycling over blobs made by
``/v1/keys/bench/datakey`` of the same key. Ceiling: the same loop posting an unsigned body
to bench/bare_app.py under the same gunicorn settings.

Client and server share this machine's cores, so the client's own CPU per request is shown
("client µs"): signing makes an XKS request cost the client more than a bearer request,
and that CPU is taken from the server. ``--presign`` adds an XKS row whose requests are
signed before the clock starts, so that its ratio to native reflects the server alone.
Read the ratios (XKS decrypt as a share of native decrypt, each as a share of the
ceiling), not the absolute numbers. AWS's default quota per external key store is 1,800
requests/s and its timeout per call 250 ms. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.common import UNTHROTTLED_BUDGET, bare_flask_server, percentile_ms  # noqa: E402
from tests.helpers import gunicorn_server, init_data_dir  # noqa: E402

PREFIX = "/bench"
PRESIGN_RATE = 2000  # requests/s pre-signed for (AWS sends at most 1,800 per key store)
META = {
    "awsPrincipalArn": "arn:aws:iam::123456789012:role/bench",
    "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000",
    "kmsViaService": "ebs",
}
# How a client process authenticates: SigV4 credential (XKS), bearer token (native), none.
Auth = tuple[str, str] | str | None


def _client(
    url: str, path: str, auth: Auth, bodies: list[Any], seconds: float, presign: int,
    ready: Any, out: Any,
) -> None:  # fmt: skip
    """One closed-loop client process: (latencies in s, errors, client CPU s, requests
    signed inside the timed loop). With ``presign``, that many XKS requests are signed
    before the clock starts and sent first."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    parts = urlsplit(url)
    host = f"localhost:{parts.port}"
    signer = (
        SigV4Auth(Credentials(*auth), "kms-xks-proxy", "us-east-1")
        if isinstance(auth, tuple)
        else None
    )

    def make(i: int) -> tuple[bytes, dict[str, str]]:
        headers = {"Content-Type": "application/json", "Host": host}
        if signer is None:
            if auth is not None:
                headers["Authorization"] = f"Bearer {auth}"
            return json.dumps(bodies[i % len(bodies)]).encode(), headers
        rid = str(uuid.uuid4())
        body = {
            "requestMetadata": {**META, "kmsOperation": "Decrypt", "kmsRequestId": rid},
            "encryptionAlgorithm": "AES_GCM",
            **bodies[i % len(bodies)],
        }
        data = json.dumps(body).encode()
        request = AWSRequest("POST", f"http://{host}{path}", data=data, headers=headers)
        signer.add_auth(request)
        return data, dict(request.headers.items())

    base = os.getpid()
    signed = [make(base - k) for k in range(presign if signer is not None else 0)]
    conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=30)
    latencies: list[float] = []
    errors, made, i = 0, 0, base
    ready.wait()  # every process is up (and done pre-signing) before the clock starts
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        i += 1
        if signed:
            data, headers = signed.pop()
        else:
            data, headers = make(i)
            made += 1
        began = time.perf_counter()
        try:
            conn.request("POST", path, body=data, headers=headers)
            response = conn.getresponse()
            response.read()
            ok = response.status == 200
        except OSError:
            conn.close()
            ok = False
        latencies.append(time.perf_counter() - began)
        errors += not ok
    out.put((latencies, errors, time.process_time() - cpu, made))


def drive(
    url: str,
    path: str,
    auth: Auth,
    bodies: list[Any],
    seconds: float,
    clients: int,
    presign: int = 0,
) -> dict[str, float]:
    """``clients`` processes for ``seconds``: requests/s, latency percentiles (ms), the
    load generator's own CPU per request (µs) and how many requests it signed while timed.
    ``presign``: XKS requests each process signs before the clock starts."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    ready = ctx.Barrier(clients + 1)
    procs = [
        ctx.Process(target=_client, args=(url, path, auth, bodies, seconds, presign, ready, queue))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    ready.wait(timeout=300)
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    latencies = sorted(x for r in results for x in r[0])
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
        "p999_ms": percentile_ms(latencies, 99.9),
        "max_ms": latencies[-1] * 1000,
        "errors": float(sum(r[1] for r in results)),
        "client_us": sum(r[2] for r in results) / max(1, len(latencies)) * 1e6,
        "signed_timed": float(sum(r[3] for r in results)),
    }


def setup(
    url: str, admin_token: str
) -> tuple[tuple[str, str], list[dict[str, str]], str, list[dict[str, Any]]]:
    """One key "bench"; a service principal with a SigV4 credential granted XKS use of it
    and 64 XKS ciphertexts; a service principal with a token granted native use of it and
    64 native blobs (from /v1/keys/bench/datakey) as decrypt bodies."""
    admin = {"Authorization": f"Bearer {admin_token}"}

    def call(method: str, path: str, body: Any = None, headers: Any = None) -> Any:
        r = requests.request(method, url + path, json=body, headers=headers or admin, timeout=30)
        r.raise_for_status()
        return r.json()

    call("POST", "/v1/principals", {"name": "aws-kms", "role": "service"})
    key_id = call("POST", "/v1/keys", {"alias": "bench"})["key_id"]
    grant = {"principal": "aws-kms", "operations": ["xks_encrypt", "xks_decrypt"]}
    call("POST", f"/v1/keys/{key_id}/grants", grant)
    cred = call("POST", "/v1/principals/aws-kms/sigv4-credentials")
    credential = (cred["access_key_id"], cred["secret_access_key"])
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    sealed = []
    path = f"{PREFIX}/kms/xks/v1/keys/bench/encrypt"
    for _ in range(64):
        rid = str(uuid.uuid4())
        body = json.dumps(
            {
                "requestMetadata": {**META, "kmsOperation": "GenerateDataKey", "kmsRequestId": rid},
                "plaintext": base64.b64encode(os.urandom(32)).decode(),
                "encryptionAlgorithm": "AES_GCM",
            }
        ).encode()
        request = AWSRequest(
            "POST", url + path, data=body, headers={"Content-Type": "application/json"}
        )
        SigV4Auth(Credentials(*credential), "kms-xks-proxy", "us-east-1").add_auth(request)
        r = requests.post(url + path, data=body, headers=dict(request.headers.items()), timeout=30)
        r.raise_for_status()
        sealed.append(r.json())

    token = call("POST", "/v1/principals", {"name": "native", "role": "service"})["token"]
    grant = {"principal": "native", "operations": ["datakey", "decrypt"]}
    call("POST", f"/v1/keys/{key_id}/grants", grant)
    app = {"Authorization": f"Bearer {token}"}
    native = []
    for i in range(64):
        context = {"row": str(i)}
        made = call("POST", "/v1/keys/bench/datakey", {"context": context}, app)
        native.append({"ciphertext": made["ciphertext"], "context": context})
    return credential, sealed, token, native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario")
    parser.add_argument("--clients", type=int, default=4, help="load-generator processes")
    parser.add_argument(
        "--presign",
        action="store_true",
        help="also run XKS decrypt with requests signed before the clock starts (up to "
        f"{PRESIGN_RATE} req/s), so the load generator's signing leaves the shared cores",
    )
    args = parser.parse_args()
    presign = math.ceil(args.seconds * PRESIGN_RATE / args.clients)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kms-bench-xks-") as tmp:
        with bare_flask_server() as url:
            rows["bare Flask ceiling"] = drive(url, "/echo", None, [{}], args.seconds, args.clients)
        data = init_data_dir(Path(tmp) / "data")
        for sync in ("FULL", "NORMAL"):
            env = {
                "KMS_XKS_URI_PREFIX": PREFIX,
                "KMS_SQLITE_SYNCHRONOUS": sync,
                "KMS_LOG_LEVEL": "WARNING",
                "KMS_AUDIT_CHECKPOINT_SECONDS": "0",
                "KMS_AUDIT_BUDGET": UNTHROTTLED_BUDGET,
                "KMS_RATE_LIMITS": "service=none",
            }
            with gunicorn_server(data, workers=2, env=env) as srv:
                if sync == "FULL":
                    credential, sealed, token, native = setup(srv.url, srv.admin_token)
                rows[f"native decrypt ({sync})"] = drive(
                    srv.url, "/v1/decrypt", token, native, args.seconds, args.clients
                )
                path = f"{PREFIX}/kms/xks/v1/keys/bench/decrypt"
                rows[f"XKS decrypt ({sync})"] = drive(
                    srv.url, path, credential, sealed, args.seconds, args.clients
                )
                if args.presign:
                    rows[f"XKS decrypt, pre-signed ({sync})"] = drive(
                        srv.url, path, credential, sealed, args.seconds, args.clients, presign
                    )
    ceiling = rows["bare Flask ceiling"]["rps"]
    print(
        f"\n{os.cpu_count()} cores, 2 gunicorn sync workers, {args.clients} client processes "
        f"(on the same cores), {args.seconds:.0f} s each; sqlite synchronous in brackets\n"
    )
    print(f"{'scenario':<33}{'req/s':>7}{'p50 ms':>8}{'p99 ms':>8}{'p99.9':>8}{'max':>8}"
          f"{'err':>5}{'client µs':>10}{'of ceiling':>11}{'of native':>10}")  # fmt: skip
    for name, r in rows.items():
        sync = name[name.find("(") :]
        native_rps = rows.get(f"native decrypt {sync}", {}).get("rps")
        share = f"{r['rps'] / native_rps:.1%}" if name.startswith("XKS") and native_rps else ""
        print(
            f"{name:<33}{r['rps']:>7.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
            f"{r['p999_ms']:>8.2f}{r['max_ms']:>8.1f}{r['errors']:>5.0f}"
            f"{r['client_us']:>10.0f}{r['rps'] / ceiling:>11.1%}{share:>10}"
        )
    for name, r in rows.items():
        if name.startswith("XKS"):
            sync = name[name.find("(") :]
            ratio = r["rps"] / rows[f"native decrypt {sync}"]["rps"]
            print(
                f"{name} / native decrypt: {ratio:.2f}x "
                f"({'meets' if ratio >= 0.8 else 'below'} the 0.8x target)"
            )
            if "pre-signed" in name and r["signed_timed"]:
                print(f"  ({r['signed_timed']:.0f} requests ran past the pre-signed ones)")
    print("\nAWS: 1,800 requests/s default quota per external key store; 250 ms per call.")


if __name__ == "__main__":
    main()
