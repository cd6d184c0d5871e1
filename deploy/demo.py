"""`make demo`: initialise a data directory, start the server, walk through the main flow
with the SDK, show the audit trail, then keep serving in the foreground (Ctrl-C stops)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from kms.client import KmsClient, decrypt_file, encrypt_file


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def kms(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kms", *args], check=True)


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}")
        try:
            if requests.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    sys.exit("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("demo-data"))
    parser.add_argument("--bind", default="127.0.0.1:8200")
    args = parser.parse_args()
    data_dir: Path = args.data_dir.resolve()
    url = f"http://{args.bind}"

    step(f"kms init --data-dir {data_dir}")
    kms("init", "--data-dir", str(data_dir))

    step(f"kms serve --data-dir {data_dir} --bind {args.bind} --workers 2")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kms",
            "serve",
            "--data-dir",
            str(data_dir),
            "--bind",
            args.bind,
            "--workers",
            "2",
        ],
        start_new_session=True,
    )
    try:
        wait_ready(url, server)
        walkthrough(url, data_dir)
        step(f"serving on {url} (admin token in {data_dir / 'admin.token'}); Ctrl-C to stop")
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def walkthrough(url: str, data_dir: Path) -> None:
    admin = KmsClient(url, (data_dir / "admin.token").read_text().strip())
    suffix = time.strftime("%Y%m%d-%H%M%S")

    step("create a service principal (its token is shown once; kept in memory here)")
    service = admin.create_principal(f"demo-app-{suffix}", "service")
    print(f"principal {service['name']} role={service['role']}")

    step("create a key; its first version is generated inside the HSM")
    key = admin.create_key(f"demo/patients-{suffix}", "demo key")
    print(f"key {key['key_id']} alias={key['alias']} version={key['current_version']}")
    admin.grant(key["key_id"], service["name"], ["datakey", "decrypt", "rewrap"])
    print(f"granted datakey, decrypt, rewrap to {service['name']}")

    app = KmsClient(url, service["token"])
    context = {"patient": "p-0001", "purpose": "demo"}

    step("datakey: a fresh DEK, plaintext for local use and wrapped for storage")
    dk = app.datakey(key["key_id"], context)
    print(f"wrapped DEK: {len(dk.ciphertext)} bytes under version {dk.key_version}")

    step("encrypt a file with the SDK (envelope: a new DEK per file, context bound)")
    plain = data_dir / "example-record.txt"
    plain.write_text("Patient p-0001: blood pressure 120/80, no allergies.\n" * 100)
    sealed = data_dir / "example-record.txt.kms"
    encrypt_file(app, key["key_id"], plain, sealed, context)
    print(
        f"{plain.name} ({plain.stat().st_size} bytes) -> {sealed.name} "
        f"({sealed.stat().st_size} bytes)"
    )

    step("decrypt it")
    opened = data_dir / "example-record.decrypted.txt"
    decrypt_file(app, sealed, opened, context)
    print(f"decrypted matches the original: {opened.read_bytes() == plain.read_bytes()}")

    step("rotate the key")
    rotated = admin.key_action(key["key_id"], "rotate")
    print(f"current version is now {rotated['current_version']}")

    step("decrypt the blob made before the rotation (version 1 stays usable)")
    decrypt_file(app, sealed, opened, context)
    print(f"old blob still decrypts: {opened.read_bytes() == plain.read_bytes()}")
    print(f"a new data key uses version {app.datakey(key['key_id'], context).key_version}")

    step("the audit trail (hash-chained; no plaintext, keys or tokens in it)")
    records = admin.audit(after=0, limit=1000)[-12:]
    for r in records:
        print(
            f"  #{r['seq']:<4} {r['time']}  {r['principal'] or '-':<28} "
            f"{r['operation']:<18} v{r['key_version'] or '-'}  {r['outcome']:<8} "
            f"{r['hash'][:16]}…"
        )


if __name__ == "__main__":
    main()
