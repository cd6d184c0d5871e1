"""`make demo`: initialise a data directory under dual control with two custodians, start
the server, walk through the main flow with the SDK (the service and its decrypt grant
proposed by the admin, approved by both custodians with `kms changes approve`, applied),
show the audit trail, then keep serving in the foreground (Ctrl-C stops).

The custodians' private keys are kept in the data directory so that the demo can sign
with them; in a deployment each stays on its custodian's own machine
(docs/dual-control.md)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms.client import KmsClient, decrypt_file, encrypt_file, pending_change

CUSTODIANS = (("officer", "keyholder"), ("dpo", "data_owner"))


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def kms(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kms", *args], check=True)


def kms_output(*args: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """Run ``kms ARGS``; its stdout and stderr (exit with its error if it fails)."""
    done = subprocess.run(
        [sys.executable, "-m", "kms", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"kms {args[0]} {args[1]} failed: {done.stderr.strip()}")
    return done.stdout, done.stderr


def custodian_pins(data_dir: Path) -> list[str]:
    """``--custodian NAME:GROUP:KEY`` for each custodian, its key pair made with ``kms
    escrow keygen`` on the first run and reused afterwards (init pins only once)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pins = []
    for name, group in CUSTODIANS:
        key_file = data_dir / f"custodian-{name}.key"
        if key_file.exists():
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                sys.exit(f"{key_file} is not a custodian key (Ed25519)")
            raw = key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            public = base64.b64encode(raw).decode()
        else:
            step(f"kms escrow keygen --out {key_file}  (custodian {name}, group {group})")
            public = kms_output("escrow", "keygen", "--out", str(key_file))[0].strip()
            print(f"public key {public}")
        pins += ["--custodian", f"{name}:{group}:{public}"]
    return pins


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

    pins = custodian_pins(data_dir)
    shown = " ".join(f"--custodian {pin.rsplit(':', 1)[0]}:KEY" for pin in pins[1::2])
    step(f"kms init --data-dir {data_dir} {shown}")
    kms("init", "--data-dir", str(data_dir), *pins)

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
        step(
            f"serving on {url} (admin token in {data_dir / 'admin.token'}, the custodians' "
            "tokens and keys beside it); Ctrl-C to stop"
        )
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

    step("propose a service principal: under dual control the admin alone cannot create it")
    proposed = admin.create_principal(f"demo-app-{suffix}", "service")
    service = approved_and_applied(url, data_dir, admin, proposed)
    print(f"principal {service['name']} role={service['role']} (its token, shown once, kept here)")

    step("create a key; its first version is generated inside the HSM")
    key = admin.create_key(f"demo/patients-{suffix}", "demo key")
    print(f"key {key['key_id']} alias={key['alias']} version={key['current_version']}")

    step("propose a grant of datakey, decrypt and rewrap: a route to plaintext, also a change")
    proposed = admin.grant(key["key_id"], service["name"], ["datakey", "decrypt", "rewrap"])
    granted = approved_and_applied(url, data_dir, admin, proposed)
    print(f"granted {', '.join(granted['operations'])} to {service['name']}")

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
    records = admin.audit(after=0, limit=1000)[-24:]
    for r in records:
        print(
            f"  #{r['seq']:<4} {r['time']}  {r['principal'] or '-':<28} "
            f"{r['operation']:<18} v{r['key_version'] or '-'}  {r['outcome']:<15} "
            f"{r['hash'][:16]}…"
        )


def approved_and_applied(
    url: str, data_dir: Path, admin: KmsClient, answer: dict[str, Any]
) -> dict[str, Any]:
    """Take a gated request's answer through dual control: each custodian reviews the
    pending change and signs its approval with the real `kms changes approve` (its own
    token and key), then the admin, its proposer, applies it. Returns what the request
    answers once applied (at once in single-operator mode)."""
    change = pending_change(answer)
    if change is None:
        print("done at once: this data directory is in single-operator mode")
        return answer
    cid = change["change_id"]
    print(f"HTTP 202: change {cid} proposed ({change['kind']}), pending approvals")
    for name, _ in CUSTODIANS:
        key_file = data_dir / f"custodian-{name}.key"
        print(f"$ kms changes approve {cid} --key {key_file.name} --custodian {name} --yes")
        out, review = kms_output(
            *("changes", "approve", cid, "--key", str(key_file), "--custodian", name, "--yes"),
            env={"KMS_URL": url, "KMS_TOKEN_FILE": str(data_dir / f"custodian-{name}.token")},
        )
        print("\n".join(f"  | {line}" for line in review.splitlines()))
        decided = json.loads(out)
        print(
            f"approved by {name}: approvals {', '.join(decided['approvals'])}, "
            f"quorum reached: {decided['approved']}"
        )
    print(f"$ kms changes apply {cid}  (as the admin, its proposer)")
    applied = admin.apply_change(cid)
    print(f"change {cid} applied")
    return applied


if __name__ == "__main__":
    main()
