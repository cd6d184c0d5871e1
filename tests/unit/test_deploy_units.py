"""The systemd units in deploy/systemd pass ``systemd-analyze verify`` (with the
installation path pointed at this checkout's virtualenv, which verify requires to exist),
and deploy/Containerfile is consistent with the repository (no container runtime here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"


def test_units_verify(tmp_path: Path) -> None:
    kms = Path(sys.executable).parent / "kms"
    assert kms.exists()
    names = sorted(p.name for p in UNITS.iterdir())
    assert {"kms.service", "kms-rotate-due.service", "kms-rotate-due.timer"} <= set(names)
    for name in names:
        text = (UNITS / name).read_text().replace("/opt/kms/.venv/bin/kms", str(kms))
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    broken = tmp_path / "broken.service"
    broken.write_text("[Service]\nType=oneshot\nExecStart=relative/path\n")
    done = subprocess.run(
        ["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0 or done.stderr


def test_server_unit_runs_kms_serve_unprivileged_with_the_gunicorn_config() -> None:
    unit = (UNITS / "kms.service").read_text()
    (exec_start,) = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
    argv = exec_start.removeprefix("ExecStart=").split()
    assert argv[:2] == ["/opt/kms/.venv/bin/kms", "serve"]
    config = argv[argv.index("--config") + 1]
    assert config == "/opt/kms/deploy/gunicorn.conf.py"  # the checkout's deploy/ at /opt/kms
    assert (ROOT / "deploy" / "gunicorn.conf.py").is_file()
    for line in (
        "User=kms",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
    ):
        assert line in unit.splitlines()
    assert "ReadWritePaths=/var/lib/kms" in unit and "TimeoutStopSec=40" in unit


def test_containerfile_copies_what_exists_and_serves_as_a_non_root_user() -> None:
    text = (ROOT / "deploy" / "Containerfile").read_text().replace("\\\n", " ")
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]
    stages = [x for x in lines if x.startswith("FROM ")]
    assert len(stages) == 2 and all(x.split()[1].startswith("debian:") for x in stages)
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    final = lines[lines.index(stages[1]) :]
    assert any("softhsm2" in x for x in final if x.startswith("RUN "))
    (user,) = [x for x in final if x.startswith("USER ")]
    assert user.split()[1] not in ("root", "0")
    assert 'VOLUME ["/var/lib/kms"]' in final
    cmd = json.loads(next(x for x in final if x.startswith("CMD ")).removeprefix("CMD "))
    entry = json.loads(next(x for x in final if x.startswith("ENTRYPOINT ")).split(" ", 1)[1])
    assert entry + cmd[:1] == ["kms", "serve"]
    assert "COPY deploy/gunicorn.conf.py " + cmd[cmd.index("--config") + 1] in final
