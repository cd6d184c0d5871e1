"""What the portable PKCS#11 calls cost (kms/backends/hsm/pkcs11_calls.py), beside the
binding's own, measured in the same run on one SoftHSM token and one session:

- baseline: AES-256-GCM encrypt and decrypt of a 32-byte DEK through python-pkcs11 (what
  the backend called before: it trusts the module's size query);
- the same through pkcs11_calls (ctypes on the binding's function list, buffers sized
  to the mechanism's output, the IV read back from the GCM parameters);
- a whole backend call, ``Pkcs11Hsm.encrypt`` and ``decrypt`` on a cached KEK (the
  process lock, the liveness check every two seconds, the IV source check).

    .venv/bin/python bench/hsm_calls.py --seconds 3

In-process, one thread. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pkcs11 import GCMParams, KeyType, Mechanism  # noqa: E402

from hsm_config import templates  # noqa: E402
from kms import config  # noqa: E402
from kms.app import hsm_config  # noqa: E402
from kms.backends.hsm import Pkcs11Hsm, pkcs11_calls  # noqa: E402
from kms.services.model import KekRef  # noqa: E402
from tests.helpers import init_data_dir  # noqa: E402


def rate(seconds: float, call: Callable[[], object]) -> float:
    """Calls per second of ``call`` over about ``seconds``."""
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            call()
        done += 100
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kms-bench-hsm-") as tmp:
        data = init_data_dir(Path(tmp) / "data")
        settings = config.from_env({"KMS_DATA_DIR": str(data)})
        hsm = Pkcs11Hsm(hsm_config(settings))
        wrapped = hsm.new_wrapped_kek()
        kek = KekRef("bench", 1, wrapped.wrapped, wrapped.root_label, wrapped.wrap_mechanism)
        dek, aad, iv = os.urandom(32), b"aad", os.urandom(12)
        _, sealed = hsm.encrypt(kek, iv, dek, aad)
        conn = hsm._conn
        assert conn is not None
        session, calls = conn.session, conn.calls
        key = session.generate_key(KeyType.AES, 256, store=False, template=templates.KEK_IN_USE)
        params = GCMParams(iv, aad)
        bound = key.encrypt(dek, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        results = {
            "python-pkcs11 encrypt": rate(
                args.seconds,
                lambda: key.encrypt(dek, mechanism=Mechanism.AES_GCM, mechanism_param=params),
            ),
            "pkcs11_calls encrypt": rate(
                args.seconds,
                lambda: pkcs11_calls.gcm_encrypt(calls, session.handle, key.handle, iv, dek, aad),
            ),
            "Pkcs11Hsm.encrypt": rate(args.seconds, lambda: hsm.encrypt(kek, iv, dek, aad)),
            "python-pkcs11 decrypt": rate(
                args.seconds,
                lambda: key.decrypt(bound, mechanism=Mechanism.AES_GCM, mechanism_param=params),
            ),
            "pkcs11_calls decrypt": rate(
                args.seconds,
                lambda: pkcs11_calls.gcm_decrypt(
                    calls, session.handle, key.handle, iv, bytes(bound), aad
                ),
            ),
            "Pkcs11Hsm.decrypt": rate(args.seconds, lambda: hsm.decrypt(kek, iv, sealed, aad)),
        }
        hsm.close()
    print(f"{'call (SoftHSM, 32-byte DEK, one thread)':<42}{'per s':>10}{'vs binding':>12}")
    for name, per_s in results.items():
        base = results[f"python-pkcs11 {name.split()[-1].split('.')[-1]}"]
        print(f"{name:<42}{per_s:>10.0f}{per_s / base:>11.2f}x")


if __name__ == "__main__":
    main()
