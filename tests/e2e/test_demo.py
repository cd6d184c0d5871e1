"""`make demo`'s walkthrough (deploy/demo.py) runs end to end against its own server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port

pytestmark = pytest.mark.e2e


def test_demo_walkthrough(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "deploy" / "demo.py"),
            "--data-dir",
            str(tmp_path / "demo"),
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
        output = "".join(lines)
        assert "Ctrl-C to stop" in output, output
        for expected in (
            "decrypted matches the original: True",
            "current version is now 2",
            "old blob still decrypts: True",
            "a new data key uses version 2",
            "rotate_key",
        ):
            assert expected in output
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        if proc.stdout is not None:
            proc.stdout.close()
