"""Client-side data-key caching against a live server: fewer KMS calls, bounded reuse,
and no repeated AES-GCM nonce under a shared DEK."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest

from kms.client import (
    DataKeyCache,
    KmsClient,
    KmsClientError,
    decrypt_bytes,
    encrypt_bytes,
    encrypt_file,
)
from kms.formats import envelope as env
from tests.helpers import Server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def app(server: Server) -> tuple[KmsClient, KmsClient]:
    admin = KmsClient(server.url, server.admin_token)
    svc = admin.create_principal("cache-app", "service")
    admin.create_key("cached")
    admin.grant("cached", "cache-app", ["datakey", "decrypt"])
    return admin, KmsClient(server.url, svc["token"])


def _calls(admin: KmsClient, op: str) -> int:
    records, after = [], 0
    while page := admin.audit(after=after, limit=1000, principal="cache-app", operation=op):
        records += page
        after = page[-1]["seq"]
    return len(records)


def test_off_by_default(app: tuple[KmsClient, KmsClient]) -> None:
    admin, svc = app
    before = _calls(admin, "datakey")
    for i in range(3):
        encrypt_bytes(svc, "cached", b"x", {"i": str(i)})
    assert _calls(admin, "datakey") == before + 3


def test_message_limit_and_unique_nonces(app: tuple[KmsClient, KmsClient]) -> None:
    admin, svc = app
    cache = DataKeyCache(max_age_seconds=300, max_messages=3, max_bytes=10**6)
    before = _calls(admin, "datakey")
    blobs = [
        encrypt_bytes(svc, "cached", f"m{i}".encode(), {"t": "1"}, cache=cache) for i in range(7)
    ]
    assert _calls(admin, "datakey") == before + 3  # ceil(7 / 3)
    headers = [env.read_header(io.BytesIO(b)) for b in blobs]
    assert len({h.wrapped_dek for h in headers}) == 3
    assert len({(h.wrapped_dek, h.nonce_prefix) for h in headers}) == 7  # no prefix reused
    for i, blob in enumerate(blobs):
        assert decrypt_bytes(svc, blob, {"t": "1"}) == f"m{i}".encode()
    assert cache.hits == 4 and cache.misses == 3


def test_byte_limit_context_separation_and_age(app: tuple[KmsClient, KmsClient]) -> None:
    admin, svc = app
    now = [0.0]
    cache = DataKeyCache(max_age_seconds=60, max_messages=100, max_bytes=250, clock=lambda: now[0])
    before = _calls(admin, "datakey")
    for _ in range(4):
        encrypt_bytes(svc, "cached", b"y" * 100, {"t": "a"}, cache=cache)  # 2 per key by bytes
    encrypt_bytes(svc, "cached", b"y", {"t": "b"}, cache=cache)  # another context, another key
    assert _calls(admin, "datakey") == before + 3
    now[0] = 61.0
    encrypt_bytes(svc, "cached", b"y", {"t": "b"}, cache=cache)  # aged out
    assert _calls(admin, "datakey") == before + 4
    with pytest.raises(KmsClientError) as err:
        encrypt_bytes(svc, "cached", b"z" * 251, {"t": "a"}, cache=cache)
    assert err.value.code == "invalid_request"


def test_decrypt_cache_and_files(app: tuple[KmsClient, KmsClient], tmp_path: Path) -> None:
    admin, svc = app
    cache = DataKeyCache(max_age_seconds=300, max_messages=10, max_bytes=10**7)
    blob = encrypt_bytes(svc, "cached", b"record", {"t": "d"}, cache=cache)
    before = _calls(admin, "decrypt")
    for _ in range(5):
        assert decrypt_bytes(svc, blob, {"t": "d"}, cache=cache) == b"record"
    assert _calls(admin, "decrypt") == before + 1
    with pytest.raises(KmsClientError):  # the cached DEK is bound to its context
        decrypt_bytes(svc, blob, {"t": "other"}, cache=cache)
    src = tmp_path / "f"
    src.write_bytes(b"f" * 5000)
    encrypt_file(svc, "cached", src, tmp_path / "f.kms", {"t": "d"}, cache=cache)
    assert "record" not in repr(cache) and "DataKeyCache(" in repr(cache)
    with pytest.raises(TypeError):
        pickle.dumps(cache)
    with pytest.raises(KmsClientError):
        DataKeyCache(max_age_seconds=0, max_messages=1, max_bytes=1)
