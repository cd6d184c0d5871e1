"""Envelope encryption throughput from the SDK with and without the data-key cache,
against a live gunicorn server (2 workers), measured in the same run.

    .venv/bin/python bench/sdk_cache.py --seconds 5

Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kms.client import DataKeyCache, KmsClient, decrypt_bytes, encrypt_bytes  # noqa: E402
from tests.helpers import gunicorn_server, init_data_dir  # noqa: E402


def rate(seconds: float, work: object) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()  # type: ignore[operator]
        n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    message = b"x" * 1024
    with tempfile.TemporaryDirectory(prefix="kms-bench-sdk-") as tmp:
        data = init_data_dir(Path(tmp) / "data")
        env = {"KMS_LOG_LEVEL": "WARNING", "KMS_AUDIT_BUDGET": "service=none"}
        with gunicorn_server(data, workers=2, env=env) as srv:
            admin = KmsClient(srv.url, srv.admin_token)
            svc = admin.create_principal("bench", "service")
            admin.create_key("bench")
            admin.grant("bench", "bench", ["datakey", "decrypt"])
            app = KmsClient(srv.url, svc["token"])
            ctx = {"tenant": "1"}
            blob = encrypt_bytes(app, "bench", message, ctx)
            cache = DataKeyCache(max_age_seconds=300, max_messages=1000, max_bytes=10**9)
            rows = [
                (
                    "encrypt 1 KiB, no cache",
                    rate(args.seconds, lambda: encrypt_bytes(app, "bench", message, ctx)),
                ),
                (
                    "encrypt 1 KiB, cache (1000 msgs/key)",
                    rate(
                        args.seconds, lambda: encrypt_bytes(app, "bench", message, ctx, cache=cache)
                    ),
                ),
                (
                    "decrypt 1 KiB, no cache",
                    rate(args.seconds, lambda: decrypt_bytes(app, blob, ctx)),
                ),
                (
                    "decrypt 1 KiB, cache",
                    rate(args.seconds, lambda: decrypt_bytes(app, blob, ctx, cache=cache)),
                ),
            ]
    print(f"\n{'scenario':<40}{'messages/s':>12}{'vs no cache':>13}")
    for i, (name, value) in enumerate(rows):
        base = rows[i - i % 2][1]
        print(f"{name:<40}{value:>12.0f}{value / base:>12.1f}x")


if __name__ == "__main__":
    main()
