"""``kms rewrap`` against a live gunicorn server: JSON Lines and directories of envelope
and blob files are moved to the current key version, resumably, with a per-version census."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kms.client import KmsClient, decrypt_file, encrypt_file
from kms.formats import blob as blobfmt
from kms.formats import envelope as env
from tests.helpers import ROOT, Server, free_port, run_kms

pytestmark = pytest.mark.e2e
_names = itertools.count()


@dataclass
class App:
    """A service principal with a key granted to it, and the CLI settings to act as it."""

    admin: KmsClient
    svc: KmsClient
    name: str
    key_id: str
    token_file: Path
    url: str

    def kms(self, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_kms(*args, "--url", url or self.url, "--token-file", str(self.token_file))

    def datakeys(self, contexts: list[dict[str, str]]) -> list[tuple[bytes, bytes]]:
        """(wrapped, plaintext) per context, made in batches."""
        out = []
        for start in range(0, len(contexts), 1000):
            body = {"items": [{"context": c} for c in contexts[start : start + 1000]]}
            results = self.svc.call("POST", f"/v1/keys/{self.key_id}/datakey", body)["results"]
            out += [(_unb64(r["ciphertext"]), _unb64(r["plaintext"])) for r in results]
        return out

    def plaintexts(self, blobs: list[tuple[bytes, dict[str, str]]]) -> list[bytes]:
        """Decrypt through the API (batch), asserting every item succeeds."""
        out = []
        for start in range(0, len(blobs), 1000):
            items = [{"ciphertext": _b64(b), "context": c} for b, c in blobs[start : start + 1000]]
            results = self.svc.call("POST", "/v1/decrypt", {"items": items})["results"]
            assert all("error" not in r for r in results), results
            out += [_unb64(r["plaintext"]) for r in results]
        return out

    def rotate(self) -> int:
        return int(self.admin.key_action(self.key_id, "rotate")["current_version"])

    def rewraps(self) -> int:
        """Successful rewrap audit records of this principal."""
        count, after = 0, 0
        while page := self.admin.audit(
            after=after, limit=1000, principal=self.name, operation="rewrap", outcome="ok"
        ):
            count += len(page)
            after = page[-1]["seq"]
        return count


def _app(
    server: Server, tmp_path: Path, ops: tuple[str, ...] = ("datakey", "decrypt", "rewrap")
) -> App:
    admin = KmsClient(server.url, server.admin_token)
    name = f"rewrap-svc-{next(_names)}"
    token = admin.create_principal(name, "service")["token"]
    key_id = admin.create_key()["key_id"]
    admin.grant(key_id, name, list(ops))
    token_file = tmp_path / f"{name}.token"
    token_file.write_text(token)
    return App(admin, KmsClient(server.url, token), name, key_id, token_file, server.url)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _summary(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in done.stderr, done.stderr
    return dict(json.loads(done.stdout))


def _census(app: App, path: Path, *args: str) -> dict[str, Any]:
    done = run_kms("rewrap", "census", str(path), *args)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _jsonl(app: App, n: int) -> tuple[list[bytes], list[bytes], list[dict[str, str]]]:
    """n input lines (with varied formatting) and the DEK and context of each."""
    contexts = [{"patient": f"p-{i}", "ward": "ä"} for i in range(n)]
    keys = app.datakeys(contexts)
    lines = []
    for i, ((wrapped, _), context) in enumerate(zip(keys, contexts, strict=True)):
        line = (
            f'{{"id": {i},  "ciphertext" : "{_b64(wrapped)}", "context":{json.dumps(context)},'
            f' "note": "café ü\\u00e9", "amount": 1.50, "nested": {{"ciphertext": "keep"}}}}'
        )
        lines.append(line.encode() + (b"\r\n" if i % 7 == 3 else b"\n"))
    return lines, [dek for _, dek in keys], contexts


def _check_output(
    app: App,
    in_lines: list[bytes],
    out: Path,
    deks: list[bytes],
    contexts: list[dict[str, str]],
    version: int,
) -> None:
    """Every line is the input line with only its blob replaced by one at ``version`` that
    still holds the same DEK."""
    out_lines = out.read_bytes().splitlines(keepends=True)
    assert len(out_lines) == len(in_lines)
    new_blobs = []
    for before, after in zip(in_lines, out_lines, strict=True):
        old_b64 = json.loads(before)["ciphertext"]
        new_b64 = json.loads(after)["ciphertext"]
        assert after == before.replace(old_b64.encode(), new_b64.encode())  # nothing else moved
        parsed = blobfmt.parse(_unb64(new_b64))
        assert (parsed.key_id, parsed.key_version) == (app.key_id, version)
        new_blobs.append(_unb64(new_b64))
    assert app.plaintexts(list(zip(new_blobs, contexts, strict=True))) == deks


def test_jsonl_rewrap_after_rotation(server: Server, tmp_path: Path) -> None:
    app = _app(server, tmp_path)
    lines, deks, contexts = _jsonl(app, 30)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"".join(lines))
    digest = _sha(src)
    assert _census(app, src)["keys"] == {app.key_id: {"1": 30}}
    assert app.rotate() == 2

    done = app.kms("rewrap", "jsonl", str(src), str(out))

    assert done.returncode == 0, done.stderr
    summary = _summary(done)
    assert summary["complete"] and summary["rewrapped"] == 30 and summary["failed"] == 0
    assert summary["keys"] == {app.key_id: {"2": 30}}
    assert _sha(src) == digest  # the input is only read
    _check_output(app, lines, out, deks, contexts, 2)
    assert _census(app, out) == {
        "blobs": 30,
        "unreadable": 0,
        "keys": {app.key_id: {"2": 30}},
        "problems": [],
    }
    assert app.rewraps() == 30
    assert not (tmp_path / "out.jsonl.partial").exists()

    again = app.kms("rewrap", "jsonl", str(src), str(out))  # a finished run only reports
    assert again.returncode == 0 and _summary(again)["rewrapped"] == 30
    assert app.rewraps() == 30


def test_jsonl_resumes_after_limit_and_server_error(server: Server, tmp_path: Path) -> None:
    app = _app(server, tmp_path)
    lines, deks, contexts = _jsonl(app, 250)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"".join(lines[:120]) + b"\n" + b"".join(lines[120:]))  # one blank line
    partial = tmp_path / "out.jsonl.partial"
    app.rotate()
    args = ("rewrap", "jsonl", str(src), str(out), "--batch-size", "40")

    first = app.kms(*args, "--max-items", "100")
    assert first.returncode == 3, first.stderr
    assert "run the same command again" in first.stderr and not out.exists()
    assert len(partial.read_bytes().splitlines()) == 100 and app.rewraps() == 100

    second = app.kms(*args, "--max-items", "70")
    assert second.returncode == 3 and _summary(second)["rewrapped"] == 170
    assert len(partial.read_bytes().splitlines()) == 171  # and the blank line

    with partial.open("ab") as f:  # a batch written but not committed when killed
        f.write(b'{"id": 999, "half a line')
    down = app.kms(*args, url=f"http://127.0.0.1:{free_port()}")  # server unreachable
    assert down.returncode == 3 and "transport_error" in down.stderr
    assert "Traceback" not in down.stderr
    assert len(partial.read_bytes().splitlines()) == 171

    last = app.kms(*args)
    assert last.returncode == 0, last.stderr
    assert _summary(last)["rewrapped"] == 250
    assert app.rewraps() == 250  # each item exactly once over four runs
    assert out.read_bytes().splitlines(keepends=True)[120] == b"\n"
    out_lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(out_lines[:120] + out_lines[121:]))
    _check_output(app, lines, out, deks, contexts, 2)


def test_jsonl_resumes_after_kill(server: Server, tmp_path: Path) -> None:
    app = _app(server, tmp_path)
    n, batch = 3000, 10
    lines, deks, contexts = _jsonl(app, n)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"".join(lines))
    state = tmp_path / "out.jsonl.rewrap-state.json"
    app.rotate()
    args = ["rewrap", "jsonl", str(src), str(out), "--batch-size", str(batch)]
    args += ["--url", app.url, "--token-file", str(app.token_file)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kms", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists() and json.loads(state.read_text())["position"]["lines"] >= 300:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not out.exists()

    done = app.kms(*args[:6])
    assert done.returncode == 0, done.stderr
    assert _summary(done)["keys"] == {app.key_id: {"2": n}}
    _check_output(app, lines, out, deks, contexts, 2)  # nothing lost, duplicated or reordered
    assert n <= app.rewraps() <= n + batch  # at most the batch in flight is redone


def _envelope(app: App, path: Path, data: bytes, context: dict[str, str]) -> None:
    plain = path.with_name(path.name + ".plain")
    plain.write_bytes(data)
    encrypt_file(app.svc, app.key_id, plain, path, context)
    plain.unlink()


def _header(path: Path) -> env.Header:
    with path.open("rb") as f:
        return env.read_header(f)


def test_directory_of_envelopes_and_blobs(server: Server, tmp_path: Path) -> None:
    app = _app(server, tmp_path)
    context = {"app": "records"}
    root = tmp_path / "store"
    (root / "sub").mkdir(parents=True)
    datas = {
        "a.kms": os.urandom(200_000),  # three full 64 KiB segments and a short one
        "b.kms": os.urandom(2 * 65536),  # the final segment is full
        "sub/c.kms": b"",
    }
    for name, data in datas.items():
        _envelope(app, root / name, data, context)
    (root / "a.kms").chmod(0o640)
    [(wrapped, dek)] = app.datakeys([context])
    (root / "d.blob").write_bytes(wrapped)
    (root / "notes.txt").write_bytes(b"not encrypted")
    _envelope(app, root / ".hidden.kms", b"skipped", context)
    hidden = (root / ".hidden.kms").read_bytes()
    before = _census(app, root)
    assert before["keys"] == {app.key_id: {"1": 4}} and before["unreadable"] == 1
    assert app.rotate() == 2
    args = ("rewrap", "dir", str(root), "--context", json.dumps(context), "--batch-size", "2")

    first = app.kms(*args, "--max-items", "3")
    assert first.returncode == 3, first.stderr
    done = app.kms(*args)

    assert done.returncode == 1, done.stderr  # notes.txt failed
    summary = _summary(done)
    assert (summary["rewrapped"], summary["failed"]) == (4, 1)
    assert summary["failures"][0]["at"] == "notes.txt" and "notes.txt: " in done.stderr
    for name, data in datas.items():
        wrapped_now = blobfmt.parse(_header(root / name).wrapped_dek)
        assert (wrapped_now.key_id, wrapped_now.key_version) == (app.key_id, 2)
        decrypt_file(app.svc, root / name, tmp_path / "plain", context)
        assert (tmp_path / "plain").read_bytes() == data
    assert stat.S_IMODE((root / "a.kms").stat().st_mode) == 0o640
    new_blob = (root / "d.blob").read_bytes()
    assert blobfmt.parse(new_blob).key_version == 2
    assert app.plaintexts([(new_blob, context)]) == [dek]
    assert (root / "notes.txt").read_bytes() == b"not encrypted"
    assert (root / ".hidden.kms").read_bytes() == hidden
    assert app.rewraps() == 4  # each file once, across the interrupted and the resumed run
    after = _census(app, root)
    assert after["keys"] == {app.key_id: {"2": 4}} and after["unreadable"] == 1
    assert not [p for p in root.rglob(".*.tmp")]


def test_directory_with_context_sidecars(server: Server, tmp_path: Path) -> None:
    app = _app(server, tmp_path)
    root = tmp_path / "store"
    root.mkdir()
    for name in ("x.kms", "y.kms", "lost.kms", "wrong.kms"):
        _envelope(app, root / name, name.encode() * 1000, {"file": name})
    for name in ("x.kms", "y.kms"):
        (root / f"{name}.ctx.json").write_text(json.dumps({"file": name}))
    (root / "wrong.kms.ctx.json").write_text(json.dumps({"file": "other"}))
    untouched = {n: (root / n).read_bytes() for n in ("lost.kms", "wrong.kms")}
    app.rotate()

    done = app.kms("rewrap", "dir", str(root), "--context-suffix", ".ctx.json")

    assert done.returncode == 1
    failures = {f["at"]: f["code"] for f in _summary(done)["failures"]}
    assert failures == {"lost.kms": "invalid_input", "wrong.kms": "decryption_failed"}
    assert "no context file" in done.stderr
    for name in ("x.kms", "y.kms"):
        assert blobfmt.parse(_header(root / name).wrapped_dek).key_version == 2
        decrypt_file(app.svc, root / name, tmp_path / "plain", {"file": name})
        assert (tmp_path / "plain").read_bytes() == name.encode() * 1000
    assert {n: (root / n).read_bytes() for n in untouched} == untouched


def test_envelopes_need_the_decrypt_grant(server: Server, tmp_path: Path) -> None:
    app = _app(server, tmp_path, ops=("datakey", "rewrap"))
    root = tmp_path / "store"
    root.mkdir()
    app.admin.grant(app.key_id, app.name, ["datakey", "decrypt", "rewrap"])
    _envelope(app, root / "e.kms", b"data", {})
    app.admin.grant(app.key_id, app.name, ["rewrap"])
    original = (root / "e.kms").read_bytes()
    app.rotate()

    done = app.kms("rewrap", "dir", str(root))

    assert done.returncode == 1
    assert _summary(done)["failures"][0]["code"] == "forbidden"
    assert (root / "e.kms").read_bytes() == original


def test_census_counts_each_version(server: Server, tmp_path: Path) -> None:
    app = _app(server, tmp_path)
    v1 = app.datakeys([{}] * 5)
    app.rotate()
    v2 = app.datakeys([{}] * 3)
    app.rotate()
    src = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"blob": _b64(w)}) for w, _ in v1 + v2] + ["oops"]
    src.write_text("\n".join(lines) + "\n")
    census = _census(app, src, "--field", "blob")
    assert census["keys"] == {app.key_id: {"1": 5, "2": 3}}
    assert census["unreadable"] == 1 and census["problems"][0].startswith("line 9: not valid JSON")

    done = app.kms("rewrap", "jsonl", str(src), str(tmp_path / "out.jsonl"), "--field", "blob")

    assert done.returncode == 1  # the "oops" line
    assert _summary(done)["keys"] == {app.key_id: {"3": 8}}
    assert _census(app, tmp_path / "out.jsonl", "--field", "blob")["keys"] == {app.key_id: {"3": 8}}


def test_bad_lines_are_reported_and_copied(server: Server, tmp_path: Path) -> None:
    app = _app(server, tmp_path)
    other = _app(server, tmp_path)  # a key this service has no grant on
    (good1, _), (good2, _), (wrong_ctx, _) = app.datakeys([{}, {}, {"a": "b"}])
    [(foreign, _)] = other.datakeys([{}])
    lines = [
        json.dumps({"ciphertext": _b64(good1)}).encode(),
        b'{"ciphertext": ',
        b'{"id": 3}',
        b'{"ciphertext": "@@not base64@@"}',
        b"[1, 2]",
        json.dumps({"ciphertext": _b64(good1), "context": "x"}).encode(),
        b"   ",
        json.dumps({"ciphertext": _b64(os.urandom(80))}).encode(),
        json.dumps({"ciphertext": _b64(wrong_ctx)}).encode(),
        json.dumps({"ciphertext": _b64(foreign)}).encode(),
        json.dumps({"ciphertext": _b64(good2)}).encode(),
        b'\xff\xfe{"ciphertext": "AA=="}',
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    digest = _sha(src)
    app.rotate()

    done = app.kms("rewrap", "jsonl", str(src), str(out))

    assert done.returncode == 1
    summary = _summary(done)
    assert (summary["rewrapped"], summary["failed"]) == (2, 9)
    codes = {f["at"]: f["code"] for f in summary["failures"]}
    assert codes == {
        "line 2": "invalid_input",
        "line 3": "invalid_input",
        "line 4": "invalid_input",
        "line 5": "invalid_input",
        "line 6": "invalid_input",
        "line 8": "malformed_blob",
        "line 9": "decryption_failed",
        "line 10": "forbidden",
        "line 12": "invalid_input",
    }
    for text in (
        "line 2: invalid_input: not valid JSON",
        "line 3: invalid_input: missing field 'ciphertext'",
        "line 4: invalid_input: field 'ciphertext' is not valid base64",
        "line 5: invalid_input: not a JSON object",
        "line 12: invalid_input: not valid UTF-8",
    ):
        assert text in done.stderr
    assert _sha(src) == digest
    out_lines = out.read_bytes().split(b"\n")[:-1]
    assert len(out_lines) == len(lines)
    for k, (before, after) in enumerate(zip(lines, out_lines, strict=True)):
        if k in (0, 10):
            assert blobfmt.parse(_unb64(json.loads(after)["ciphertext"])).key_version == 2
        else:
            assert after == before  # failed and blank lines are copied unchanged


def test_refuses_unsafe_or_mismatched_runs(server: Server, tmp_path: Path) -> None:
    app = _app(server, tmp_path)
    lines, _, _ = _jsonl(app, 5)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"".join(lines))

    same = app.kms("rewrap", "jsonl", str(src), str(src))
    assert same.returncode == 2 and "four different files" in same.stderr

    out.write_text("precious")
    exists = app.kms("rewrap", "jsonl", str(src), str(out))
    assert exists.returncode == 2 and "already exists" in exists.stderr
    assert out.read_text() == "precious"
    out.unlink()

    partly = app.kms("rewrap", "jsonl", str(src), str(out), "--max-items", "2")
    assert partly.returncode == 3
    src.write_bytes(b"".join(lines[:4]))  # the input changed under a saved run
    changed = app.kms("rewrap", "jsonl", str(src), str(out))
    assert changed.returncode == 2 and "belongs to another run" in changed.stderr

    no_token = run_kms("rewrap", "jsonl", str(src), str(tmp_path / "o2"), env={"KMS_TOKEN": ""})
    assert no_token.returncode == 2 and "token" in no_token.stderr
    assert not (tmp_path / "o2.rewrap-state.json").exists()

    bad_ctx = app.kms("rewrap", "dir", str(tmp_path), "--context", "[1]")
    assert bad_ctx.returncode == 2 and "--context" in bad_ctx.stderr
    for done in (same, exists, changed, no_token, bad_ctx):
        assert "Traceback" not in done.stderr


def test_retired_versions_are_failed_items(server: Server, tmp_path: Path) -> None:
    app = _app(server, tmp_path)
    [(v1, _)] = app.datakeys([{}])
    app.rotate()
    [(v2, dek2)] = app.datakeys([{}])
    app.rotate()
    app.admin.configure_key(app.key_id, min_decryption_version=2)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(f'{{"ciphertext": "{_b64(v1)}"}}\n{{"ciphertext": "{_b64(v2)}"}}\n')

    done = app.kms("rewrap", "jsonl", str(src), str(out))

    assert done.returncode == 1
    summary = _summary(done)
    assert summary["failures"] == [
        {
            "at": "line 1",
            "code": "key_version_retired",
            "message": summary["failures"][0]["message"],
        }
    ]
    assert summary["keys"] == {app.key_id: {"1": 1, "3": 1}}  # the retired blob is still v1
    first, second = out.read_text().splitlines()
    assert first == src.read_text().splitlines()[0]
    new = _unb64(json.loads(second)["ciphertext"])
    assert blobfmt.parse(new).key_version == 3 and app.plaintexts([(new, {})]) == [dek2]
