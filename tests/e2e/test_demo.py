"""`make demo`'s walkthrough (deploy/demo.py) runs end to end against its own server, under
dual control: the service and its decrypt grant are proposed by the admin, approved by
both custodians with the real `kms changes approve`, and applied; run again on the same
data directory, it reuses the custodians' keys and works the same."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port

pytestmark = pytest.mark.e2e


def _demo(data_dir: Path) -> str:
    """Run the demo until it serves; its output (it must stop cleanly on Ctrl-C)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "deploy" / "demo.py"),
            "--data-dir",
            str(data_dir),
            "--bind",
            f"127.0.0.1:{free_port()}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C to stop" in line or time.monotonic() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        if proc.stdout is not None:
            proc.stdout.close()
    return "".join(lines)


def _assert_walkthrough(output: str) -> None:
    assert "Ctrl-C to stop" in output, output
    assert "control policy: mode=dual" in output
    changes = re.findall(r"HTTP 202: change ([0-9a-f-]{36}) proposed \((\w+)\)", output)
    assert [kind for _, kind in changes] == ["create_principal", "grant"], output
    for cid, _ in changes:
        for name in ("officer", "dpo"):
            assert f"$ kms changes approve {cid} --key custodian-{name}.key --custodian {name}" in (
                output
            )
        assert f"| Change {cid}:" in output  # what each custodian signed, shown
        assert f"change {cid} applied" in output
    assert output.count("approved by officer: approvals officer, quorum reached: False") == 2
    assert output.count("approved by dpo: approvals dpo, officer, quorum reached: True") == 2
    assert "(recomputed here: it matches)" in output
    for expected in (
        "granted datakey, decrypt, rewrap to demo-app-",
        "decrypted matches the original: True",
        "current version is now 2",
        "old blob still decrypts: True",
        "a new data key uses version 2",
        "rotate_key",
        "approve_change",
        "apply_change",
    ):
        assert expected in output


def test_demo_walkthrough(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    first = _demo(data_dir)
    _assert_walkthrough(first)
    assert "kms escrow keygen --out" in first
    assert "custodian officer pinned in group keyholder; its token written to" in first
    keys = {name: (data_dir / f"custodian-{name}.key").read_bytes() for name in ("officer", "dpo")}
    again = _demo(data_dir)
    _assert_walkthrough(again)
    assert "kms escrow keygen" not in again and "admin already exists" in again
    assert keys == {n: (data_dir / f"custodian-{n}.key").read_bytes() for n in keys}
