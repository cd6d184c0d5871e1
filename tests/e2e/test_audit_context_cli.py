"""The auditor's query by encryption context through the real ``kms`` command and the SDK,
against a live gunicorn server (keyed context hashes, issue 15 item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kms.client import KmsClient, KmsClientError
from tests.helpers import Server, run_kms

pytestmark = pytest.mark.e2e


def test_records_of_a_context_from_the_command_line(server: Server, tmp_path: Path) -> None:
    admin = KmsClient(server.url, server.admin_token)
    svc = admin.create_principal("ctx-app", "service")
    admin.create_key("ctx-k")
    admin.grant("ctx-k", "ctx-app", ["datakey", "decrypt"])
    app = KmsClient(server.url, svc["token"])
    for n in (1, 2, 1):
        dk = app.datakey("ctx-k", {"patient": f"p-{n}"})
        assert app.decrypt(dk.ciphertext, {"patient": f"p-{n}"}) == dk.plaintext
    auditor = admin.create_principal("ctx-auditor", "auditor")
    token = tmp_path / "auditor.token"
    token.write_text(auditor["token"])
    env = {"KMS_URL": server.url, "KMS_TOKEN_FILE": str(token)}

    done = run_kms("audit", "list", "--context", '{"patient": "p-1"}', env=env)
    assert done.returncode == 0, done.stderr
    records = [json.loads(x) for x in done.stdout.splitlines()]
    assert [r["operation"] for r in records] == ["datakey", "decrypt"] * 2
    assert len({r["context_sha256"] for r in records}) == 1
    # filters combine with the context; the SDK gives the same records
    done = run_kms(
        "audit", "list", "--context", '{"patient": "p-1"}', "--operation", "decrypt", env=env
    )
    assert [json.loads(x) for x in done.stdout.splitlines()] == records[1::2]
    sdk = KmsClient(server.url, auditor["token"])
    assert sdk.audit_by_context({"patient": "p-1"}, limit=4)[:4] == records
    assert (
        sdk.audit_by_context({"patient": "p-1"}, after=records[-1]["seq"], limit=1)
        == [
            q for q in sdk.audit(after=records[-1]["seq"]) if q["operation"] == "read_audit_context"
        ][:1]
    )
    # each query is in the trail, under the auditor, without the context
    queries = [r for r in admin.audit(limit=1000) if r["operation"] == "read_audit_context"]
    assert len(queries) == 4 and {q["principal"] for q in queries} == {"ctx-auditor"}
    assert {q["context_sha256"] for q in queries} == {records[0]["context_sha256"]}
    assert "p-1" not in json.dumps(admin.audit(limit=1000))

    bad_json = run_kms("audit", "list", "--context", "{patient", env=env)
    assert bad_json.returncode == 2 and "--context" in bad_json.stderr
    not_object = run_kms("audit", "list", "--context", '["p-1"]', env=env)
    assert not_object.returncode == 2 and "JSON object" in not_object.stderr
    bad_value = run_kms("audit", "list", "--context", '{"patient": 1}', env=env)
    assert bad_value.returncode != 0 and "invalid_request" in bad_value.stderr
    assert "Traceback" not in bad_value.stderr
    with pytest.raises(KmsClientError) as refused:
        app.audit_by_context({"patient": "p-1"})
    assert refused.value.code == "forbidden"
