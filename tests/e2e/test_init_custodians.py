"""``kms init --custodian``: the first custodian of each group is pinned at deployment, on
the server host, through the real ``kms`` command (kms/services/custodians.py
``pin_custodian``); the audit trail records it; bad values are one clear line."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.helpers import run_kms

pytestmark = pytest.mark.e2e


def _public() -> str:
    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def test_init_pins_first_custodians_once_and_refuses_bad_values(tmp_path: Path) -> None:
    data = tmp_path / "data"
    dpo, officer = _public(), _public()
    done = run_kms(
        "init",
        "--data-dir",
        str(data),
        "--custodian",
        f"dpo:data_owner:{dpo}",
        "--custodian",
        f"kh-officer:keyholder:{officer}",
    )
    assert done.returncode == 0, done.stderr
    token_file = data / "custodian-dpo.token"
    assert f"custodian dpo pinned in group data_owner; its token written to {token_file}" in (
        done.stdout
    )
    assert token_file.stat().st_mode & 0o077 == 0
    assert token_file.read_text().startswith("kms_")
    # idempotent: the same pins again change nothing and write no new token
    again = run_kms("init", "--data-dir", str(data), "--custodian", f"dpo:data_owner:{dpo}")
    assert again.returncode == 0, again.stderr
    assert "custodian dpo pinned in group data_owner\n" in again.stdout
    # a second member is never pinned: it needs the API and an endorsement
    second = run_kms(
        "init", "--data-dir", str(data), "--custodian", f"dpo-2:data_owner:{_public()}"
    )
    assert second.returncode != 0
    assert "already has custodians" in second.stderr and "Traceback" not in second.stderr
    for bad in ("dpo", "dpo:data_owner", "dpo:data_owner:!!", f"dpo::{dpo}", "x:bad group!:" + dpo):
        refused = run_kms("init", "--data-dir", str(data), "--custodian", bad)
        assert refused.returncode != 0, bad
        assert "Traceback" not in refused.stderr and refused.stderr.strip(), bad
    # the audit trail records each pin once, with the key's hash and no principal
    with sqlite3.connect(data / "kms.sqlite3") as db:
        rows = db.execute(
            "SELECT principal, detail FROM audit_records WHERE operation = 'pin_custodian' "
            "ORDER BY seq"
        ).fetchall()
    assert [(p, d.split()[0]) for p, d in rows] == [
        (None, "custodian=dpo"),
        (None, "custodian=kh-officer"),
    ]
    assert hashlib.sha256(base64.b64decode(dpo)).hexdigest()[:16] in rows[0][1]
