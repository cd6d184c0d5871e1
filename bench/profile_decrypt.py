"""Where a decrypt's time goes: one process, no HTTP server, no load generator.

    .venv/bin/python bench/profile_decrypt.py --requests 3000

Drives the Flask app in process through WSGI and times, per request, the bare Flask
endpoint of bench/run.py's ceiling, a KMS single decrypt and a 1000-item batch decrypt,
and inside them the phases of the request path (wall-clock time spent in each, summed
over the run). Same data directory layout, SQLite ``synchronous=NORMAL``, metrics and
rate limiting on, as in bench/run.py. No background loop runs here, so the WAL is not
checkpointed (a server's workers do that off the request path, twice a second).

Then, in a separate pass under cProfile, it counts the Python function calls a request
makes (exact, unlike times) and splits them and the profiled time by library, bare
endpoint beside KMS decrypt: the request path is bound by the interpreter, so the calls
it makes are what a leaner path would have to remove. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import pstats
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from werkzeug.test import EnvironBuilder  # noqa: E402

from bench.bare_app import app as bare_app  # noqa: E402
from kms import config  # noqa: E402
from kms.app import create_app  # noqa: E402
from kms.backends.storage.sql_storage import SqlStorage  # noqa: E402
from kms.services import crypto, key_work  # noqa: E402
from kms.services.audit import AuditTrail  # noqa: E402
from tests.helpers import init_data_dir  # noqa: E402

SPENT: defaultdict[str, float] = defaultdict(float)

# (owner, attribute, label): the phases timed, in request order
CALLS = [
    (key_work.KeyWork, "use", "key and grant look-up and decision (cache or read)"),
    (crypto.CryptoService, "_open", "HSM decrypt (PKCS#11)"),
    (AuditTrail, "drafts", "audit records encoded (outside the lock)"),
    (key_work.KeyWork, "commit", "decision again at commit on fresh rows"),
    (AuditTrail, "append_drafts", "audit append: head, chain, insert"),
]


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start

    return timed


def _timed_transaction(fn: Callable[..., Any]) -> Callable[..., Any]:
    @contextmanager
    def transaction(self: SqlStorage) -> Iterator[Any]:
        start = time.perf_counter()
        with fn(self) as tx:
            SPENT["write transaction: lock, BEGIN"] += time.perf_counter() - start
            yield tx
            start = time.perf_counter()
        SPENT["write transaction: COMMIT, unlock"] += time.perf_counter() - start

    return transaction


def instrument() -> None:
    for owner, name, label in CALLS:
        timed = _timed(label, getattr(owner, name))
        static = isinstance(inspect.getattr_static(owner, name), staticmethod)
        setattr(owner, name, staticmethod(timed) if static else timed)
    SqlStorage.transaction = _timed_transaction(SqlStorage.transaction)  # type: ignore[method-assign]


def per_request(app: Any, path: str, body: bytes, headers: dict[str, str], n: int) -> float:
    """Seconds per request through ``app``'s WSGI interface (environ built outside)."""
    environs = (
        EnvironBuilder(path=path, method="POST", data=body, headers=headers).get_environ()
        for _ in range(n)
    )
    statuses: list[str] = []
    spent = 0.0
    for environ in environs:
        start = time.perf_counter()
        b"".join(app(environ, lambda status, _h, _e=None: statuses.append(status)))
        spent += time.perf_counter() - start
    assert all(s.startswith("200") for s in statuses), set(statuses)
    return spent / n


def by_library(
    app: Any, path: str, body: bytes, headers: dict[str, str], n: int
) -> tuple[Counter[str], Counter[str]]:
    """Python function calls and profiled seconds per request, by library, for ``n``
    requests under cProfile (the environs are built before profiling starts)."""
    environs = [
        EnvironBuilder(path=path, method="POST", data=body, headers=headers).get_environ()
        for _ in range(n)
    ]
    profiler = cProfile.Profile()
    profiler.enable()
    for environ in environs:
        b"".join(app(environ, lambda _s, _h, _e=None: None))
    profiler.disable()
    calls: Counter[str] = Counter()
    spent: Counter[str] = Counter()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    for (filename, _line, _name), (_prim, ncalls, own, _cum, _callers) in stats.items():
        library = _library(filename)
        calls[library] += ncalls / n
        spent[library] += own / n
    return calls, spent


def _library(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if filename.startswith(str(ROOT)):
        return "/".join(Path(filename).relative_to(ROOT).parts[:2])
    if filename == "~":
        return "C functions (SQLite, json, hashlib, ...)"
    return "standard library"


def report_calls(
    bare: tuple[Counter[str], Counter[str]], kms: tuple[Counter[str], Counter[str]]
) -> None:
    print("\nPython function calls per request, by library (cProfile; time is profiled time)")
    print(f"  {'library':<44}{'bare calls':>11}{'KMS calls':>11}{'KMS time':>10}")
    total = sum(kms[1].values())
    for library, count in sorted(kms[0].items(), key=lambda kv: -kv[1])[:16]:
        share = kms[1][library] / total
        print(f"  {library:<44}{bare[0][library]:>11.0f}{count:>11.0f}{share:>10.1%}")
    print(f"  {'all':<44}{sum(bare[0].values()):>11.0f}{sum(kms[0].values()):>11.0f}")


def report(title: str, total: float, units: int, unit: str) -> None:
    print(f"\n{title}: {total / units * 1e6:.1f} µs per {unit}")
    for label, spent in SPENT.items():
        print(f"  {label:<52}{spent / units * 1e6:>8.1f} µs  {spent / total:>6.1%}")
    inside = sum(SPENT.values())
    print(
        f"  {'everything else (Flask, auth, JSON, base64, limits)':<52}"
        f"{(total - inside) / units * 1e6:>8.1f} µs  {(total - inside) / total:>6.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kms-profile-") as tmp:
        data = init_data_dir(Path(tmp) / "data")
        settings = config.from_env(
            {
                "KMS_DATA_DIR": str(data),
                "KMS_SQLITE_SYNCHRONOUS": "NORMAL",
                "KMS_LOG_LEVEL": "WARNING",
                "KMS_AUDIT_CHECKPOINT_SECONDS": "0",
            }
        )
        app = create_app(settings)
        client = app.test_client()
        admin = {"Authorization": "Bearer " + (data / "admin.token").read_text().strip()}
        svc = client.post("/v1/principals", json={"name": "p", "role": "service"}, headers=admin)
        client.post("/v1/keys", json={"alias": "k"}, headers=admin)
        grant = {"principal": "p", "operations": ["datakey", "decrypt"]}
        client.post("/v1/keys/k/grants", json=grant, headers=admin)
        headers = {
            "Authorization": "Bearer " + svc.json["token"],  # type: ignore[index]
            "Content-Type": "application/json",
        }
        items = []
        for i in range(200):
            context = {"row": str(i)}
            made = client.post("/v1/keys/k/datakey", json={"context": context}, headers=headers)
            items.append({"ciphertext": made.json["ciphertext"], "context": context})  # type: ignore[index]
        single = [json.dumps(items[0]).encode()]
        batch = json.dumps({"items": [items[i % 200] for i in range(1000)]}).encode()

        n = args.requests
        bare = per_request(bare_app.wsgi_app, "/echo", single[0], headers, n)
        per_request(app.wsgi_app, "/v1/decrypt", single[0], headers, 300)  # warm caches
        calls_bare = by_library(bare_app.wsgi_app, "/echo", single[0], headers, n)
        calls_kms = by_library(app.wsgi_app, "/v1/decrypt", single[0], headers, n)
        instrument()
        SPENT.clear()
        one = per_request(app.wsgi_app, "/v1/decrypt", single[0], headers, n)
        print(
            f"bare Flask endpoint: {bare * 1e6:.1f} µs per request; "
            f"KMS decrypt: {one / bare:.1f}x that"
        )
        report("single decrypt", one * n, n, "request")
        SPENT.clear()
        batches = max(3, n // 300)
        many = per_request(app.wsgi_app, "/v1/decrypt", batch, headers, batches)
        report("batch decrypt, 1000 items", many * batches, batches * 1000, "item")
        report_calls(calls_bare, calls_kms)


if __name__ == "__main__":
    main()
