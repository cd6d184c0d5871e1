"""The real ``kms`` command: init, admin commands against a live server, clear failures."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.helpers import Server, free_port, run_kms

pytestmark = pytest.mark.e2e


def test_init_is_idempotent_and_private(fresh_data_dir: Path) -> None:
    token = (fresh_data_dir / "admin.token").read_text()
    for name in ("admin.token", "hsm.pin", "hsm.so-pin", "kms.sqlite3"):
        assert stat.S_IMODE((fresh_data_dir / name).stat().st_mode) == 0o600, name
    again = run_kms("init", "--data-dir", str(fresh_data_dir))
    assert again.returncode == 0, again.stderr
    assert "none (already present)" in again.stdout and "no new token" in again.stdout
    assert (fresh_data_dir / "admin.token").read_text() == token


def test_admin_commands_against_a_live_server(server: Server) -> None:
    env = server.admin_env

    def kms(*args: str) -> object:
        done = run_kms(*args, env=env)
        assert done.returncode == 0, done.stderr
        return (
            json.loads(done.stdout) if done.stdout.strip().startswith(("{", "[")) else done.stdout
        )

    created = kms("principals", "create", "cli-svc", "--role", "service")
    assert created["token"].startswith("kms_")  # type: ignore[index]
    key = kms("keys", "create", "--alias", "cli-key", "--description", "made by the CLI")
    assert kms("keys", "show", "cli-key")["key_id"] == key["key_id"]  # type: ignore[index]
    assert kms(
        "grants", "set", "cli-key", "--principal", "cli-svc", "--operations", "datakey,decrypt"
    )["operations"] == ["datakey", "decrypt"]  # type: ignore[index]
    assert kms("keys", "rotate", "cli-key")["current_version"] == 2  # type: ignore[index]
    assert kms("keys", "disable", "cli-key")["state"] == "disabled"  # type: ignore[index]
    assert (
        kms("keys", "schedule-deletion", "cli-key", "--pending-days", "7")["state"]
        == "pending_deletion"
    )  # type: ignore[index]
    assert kms("keys", "cancel-deletion", "cli-key")["state"] == "disabled"  # type: ignore[index]
    assert kms("keys", "enable", "cli-key")["state"] == "enabled"  # type: ignore[index]
    assert any(k["alias"] == "cli-key" for k in kms("keys", "list"))  # type: ignore[union-attr]
    assert any(p["name"] == "cli-svc" for p in kms("principals", "list"))  # type: ignore[union-attr]
    lines = run_kms("audit", "list", "--limit", "1000", env=env).stdout.splitlines()
    ops = [json.loads(x)["operation"] for x in lines]
    assert {"create_principal", "create_key", "grant", "rotate_key"} <= set(ops)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("keys", "show", "no-such-key"), "not_found"),
        (("keys", "create", "--alias", "bad alias"), "invalid_request"),
        (("keys", "schedule-deletion", "x", "--pending-days", "3"), "not in the range"),
        (("grants", "set", "x", "--principal", "p", "--operations", "fly"), "invalid_request"),
        (("principals", "create", "x", "--role", "king"), "Invalid value"),
    ],
)
def test_cli_errors_are_one_clear_line(server: Server, args: tuple[str, ...], message: str) -> None:
    env = server.admin_env
    done = run_kms(*args, env=env)
    assert done.returncode != 0 and message in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_refuses_bad_credentials_and_unreachable_server(server: Server, tmp_path: Path) -> None:
    bad = tmp_path / "bad.token"
    bad.write_text("kms_wrong")
    done = run_kms("keys", "list", "--url", server.url, "--token-file", str(bad))
    assert (
        done.returncode == 1 and "unauthenticated" in done.stderr and "Traceback" not in done.stderr
    )
    done = run_kms(
        "keys", "list", "--url", f"http://127.0.0.1:{free_port()}", "--token-file", str(bad)
    )
    assert done.returncode == 1 and "transport_error" in done.stderr
    done = run_kms("keys", "list", "--url", "ftp://x", "--token-file", str(bad))
    assert done.returncode == 1 and "invalid_config" in done.stderr
    done = run_kms("keys", "list", env={"KMS_TOKEN": "", "KMS_TOKEN_FILE": ""})
    assert done.returncode == 2 and "token" in done.stderr


def test_serve_refuses_an_uninitialised_directory(tmp_path: Path) -> None:
    done = run_kms("serve", "--data-dir", str(tmp_path))
    assert done.returncode == 1 and "kms init" in done.stderr


def test_init_reports_missing_pin_file_for_external_module(tmp_path: Path) -> None:
    done = run_kms("init", "--data-dir", str(tmp_path / "d"), "--pkcs11-module", "/nope.so")
    assert done.returncode == 2 and "--pin-file" in done.stderr
