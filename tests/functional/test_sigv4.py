"""SigV4: credentials issued and revoked through the admin API, and verification of
requests signed by botocore's own signer (a client this project did not write)."""

from __future__ import annotations

import json
import sqlite3
import string
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.errors import StorageUnavailable
from kms.formats import sigv4 as fmt
from kms.services.sigv4 import SignedRequest, SigV4Refused
from tests.helpers import Api

HOST = "kms.internal:8443"
PATH = "/example/prefix/kms/xks/v1/keys/foo/decrypt"


def sign(
    akid: str,
    secret: str,
    body: bytes | None = None,
    service: str = "kms-xks-proxy",
    region: str = "eu-west-3",
    headers: dict[str, str] | None = None,
    when: datetime | None = None,
    path: str = PATH,
) -> SignedRequest:
    """A request signed by botocore, as our server would receive it (by default with a
    unique body: the same signed request twice is a replay)."""
    body = body if body is not None else json.dumps({"nonce": uuid.uuid4().hex}).encode()
    request = AWSRequest(
        method="POST",
        url=f"https://{HOST}{path}",
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    signer = SigV4Auth(Credentials(akid, secret), service, region)
    if when is None:
        signer.add_auth(request)
    else:  # botocore reads the time through this function
        with mock.patch("botocore.auth.get_current_datetime", lambda: when):
            signer.add_auth(request)
    received = {k.lower(): str(v) for k, v in request.headers.items()}
    received["host"] = HOST
    return SignedRequest("POST", path, "", received, body)


@pytest.fixture
def svc(api: Api) -> dict[str, str]:
    return api.principal("service", "aws-svc")


def issue(api: Api, name: str = "aws-svc") -> tuple[str, str]:
    r = api.call("POST", f"/v1/principals/{name}/sigv4-credentials", api.admin)
    assert r.status_code == 201, r.json
    return r.json["access_key_id"], r.json["secret_access_key"]


def verify(app: Any, request: SignedRequest, service: str = "kms-xks-proxy") -> Any:
    return app.extensions["kms"].sigv4.verify(request, service)


def refusal(app: Any, request: SignedRequest, service: str = "kms-xks-proxy") -> str:
    with pytest.raises(SigV4Refused) as e:
        verify(app, request, service)
    assert e.value.status == 401
    return e.value.reason


def test_issued_credentials_have_the_spec_formats(app: Any, api: Api, svc: Any) -> None:
    akid, secret = issue(api)
    assert 20 <= len(akid) <= 30 and set(akid) <= set(string.ascii_uppercase + "234567")
    assert 43 <= len(secret) <= 64 and set(secret) <= set(
        string.ascii_letters + string.digits + "+/="
    )
    verified = verify(app, sign(akid, secret))
    assert verified.principal.name == "aws-svc" and verified.region == "eu-west-3"


def test_secret_is_never_stored_in_clear(app: Any, api: Api, svc: Any, db_path: Path) -> None:
    akid, secret = issue(api)
    raw = b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))
    assert akid.encode() in raw and secret.encode() not in raw
    records = api.audit()
    assert records[-1]["operation"] == "issue_sigv4_credential" and akid in records[-1]["detail"]
    assert all(secret not in str(r) for r in records)


def test_two_active_credentials_rotate_without_downtime(app: Any, api: Api, svc: Any) -> None:
    old = issue(api)
    new = issue(api)
    third = api.call("POST", "/v1/principals/aws-svc/sigv4-credentials", api.admin)
    assert third.status_code == 409 and third.json["error"]["code"] == "conflict"
    for akid, secret in (old, new):
        assert verify(app, sign(akid, secret)).access_key_id == akid
    r = api.call("DELETE", f"/v1/principals/aws-svc/sigv4-credentials/{old[0]}", api.admin)
    assert r.status_code == 200 and r.json["state"] == "revoked"
    assert refusal(app, sign(*old)) == "unknown_key"
    assert verify(app, sign(*new)).access_key_id == new[0]
    again = api.call("DELETE", f"/v1/principals/aws-svc/sigv4-credentials/{old[0]}", api.admin)
    assert again.status_code == 409
    assert issue(api)[0] != old[0]  # room for a second one again


@pytest.mark.parametrize(
    ("path", "who", "status"),
    [
        ("/v1/principals/nobody/sigv4-credentials", "admin", 404),
        ("/v1/principals/aws-svc/sigv4-credentials", "service", 403),
        ("/v1/principals/aws-svc/sigv4-credentials", "none", 401),
    ],
)
def test_issuing_is_for_admins_and_existing_principals(
    api: Api, svc: Any, path: str, who: str, status: int
) -> None:
    headers = {"admin": api.admin, "service": svc, "none": {}}[who]
    assert api.call("POST", path, headers).status_code == status


def test_revoking_checks_the_owner_and_the_id(api: Api, svc: Any) -> None:
    akid, _ = issue(api)
    other = api.principal("service", "other")
    assert other
    base = "/v1/principals"
    assert (
        api.call("DELETE", f"{base}/other/sigv4-credentials/{akid}", api.admin).status_code == 404
    )
    bad = api.call("DELETE", f"{base}/aws-svc/sigv4-credentials/x'%3B--", api.admin)
    assert bad.status_code == 400 and bad.json["error"]["code"] == "invalid_request"


def test_each_check_refuses_with_its_reason(app: Any, api: Api, svc: Any) -> None:
    akid, secret = issue(api)
    good = sign(akid, secret)
    assert refusal(app, good, service="kms") == "wrong_service"
    assert refusal(app, sign(akid, secret, service="kms")) == "wrong_service"
    assert refusal(app, sign("KMSAAAAAAAAAAAAAAAAAAAAAAAA", secret)) == "unknown_key"
    assert (
        refusal(app, sign(akid, ("y" if secret[0] == "x" else "x") + secret[1:])) == "bad_signature"
    )
    tampered_body = replace(good, body=good.body + b" ")
    assert refusal(app, tampered_body) == "bad_signature"
    tampered_path = replace(good, raw_path=PATH.replace("decrypt", "encrypt"))
    assert refusal(app, tampered_path) == "bad_signature"
    other_host = replace(good, headers={**good.headers, "host": "kms.internal"})
    assert refusal(app, other_host) == "bad_signature"  # the port is part of the signed host
    no_auth = replace(good, headers={k: v for k, v in good.headers.items() if k != "authorization"})
    assert refusal(app, no_auth) == "missing"
    garbage = replace(good, headers={**good.headers, "authorization": "AWS4-HMAC-SHA256 x"})
    assert refusal(app, garbage) == "malformed"
    no_date = replace(good, headers={k: v for k, v in good.headers.items() if k != "x-amz-date"})
    assert refusal(app, no_date) == "malformed"
    for impossible in ("13", "00"):  # the pattern's digits, but no such month
        date = good.headers["x-amz-date"]
        bad_date = date[:4] + impossible + date[6:]
        auth = good.headers["authorization"].replace(date[:8], bad_date[:8])
        odd = replace(good, headers={**good.headers, "x-amz-date": bad_date, "authorization": auth})
        assert refusal(app, odd) == "malformed"
    assert verify(app, good).access_key_id == akid  # none of the above consumed it


def test_clock_skew_limit_is_five_minutes(app: Any, api: Api, svc: Any) -> None:
    akid, secret = issue(api)
    now = datetime.now(UTC).replace(tzinfo=None)  # as botocore
    for minutes in (-4, 4):
        assert verify(app, sign(akid, secret, when=now + timedelta(minutes=minutes)))
    for minutes in (-6, 6):
        assert refusal(app, sign(akid, secret, when=now + timedelta(minutes=minutes))) == "expired"


def test_a_replayed_request_is_refused(app: Any, api: Api, svc: Any) -> None:
    akid, secret = issue(api)
    request = sign(akid, secret)
    assert verify(app, request)
    assert refusal(app, request) == "replayed"
    assert verify(app, sign(akid, secret, body=b'{"a": 2}'))  # a new request is fine


def test_the_nonce_store_failing_refuses_the_request(
    app: Any, api: Api, svc: Any, db_path: Path
) -> None:
    akid, secret = issue(api)
    with sqlite3.connect(db_path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON sigv4_nonces "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    with pytest.raises(StorageUnavailable):
        verify(app, sign(akid, secret))


def test_any_signed_header_list_and_unsigned_extra_headers(app: Any, api: Api, svc: Any) -> None:
    akid, secret = issue(api)
    request = sign(akid, secret, headers={"X-Amz-Target": "TrentService.Decrypt"})
    assert "x-amz-target" in request.headers["authorization"]
    assert verify(app, request)
    extra = sign(akid, secret)
    extra = replace(extra, headers={**extra.headers, "x-forwarded-for": "10.0.0.1"})
    assert verify(app, extra)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    secret=st.text(string.ascii_letters + string.digits + "+/=", min_size=43, max_size=64),
    region=st.from_regex(r"[a-z]{2}-[a-z]{4,9}-[1-9]", fullmatch=True),
    body=st.binary(max_size=300),
    path=st.from_regex(r"(/[A-Za-z0-9_-]{1,12}){1,4}", fullmatch=True),
    header=st.from_regex(r"[A-Za-z0-9 ]{0,40}", fullmatch=True),
)
def test_our_signature_equals_botocores(
    secret: str, region: str, body: bytes, path: str, header: str
) -> None:
    """Property: for secrets of 43 to 64 characters, any region, body, path and extra
    signed header, we compute exactly botocore's signature."""
    request = sign(
        "KMSTESTTESTTESTTEST234567",
        secret,
        body,
        region=region,
        path=path,
        headers={"X-Custom": header},
    )
    auth = fmt.parse_authorization(request.headers["authorization"])
    canonical = fmt.canonical_request("POST", path, "", request.headers, auth.signed_headers, body)
    key = fmt.signing_key(secret, auth.date, region, "kms-xks-proxy")
    to_sign = fmt.string_to_sign(request.headers["x-amz-date"], auth.scope, canonical)
    assert fmt.signature(key, to_sign) == auth.signature


@pytest.mark.parametrize(
    "header",
    [
        "",
        "AWS4-HMAC-SHA256",
        "AWS4-HMAC-SHA1 Credential=a/20260101/us-east-1/s/aws4_request, SignedHeaders=host, "
        "Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 Credential=AKIDAKIDAKIDAKID/2026/us-east-1/s/aws4_request, "
        "SignedHeaders=host, Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 Credential=AKIDAKIDAKIDAKID/20260101/us-east-1/s/aws4_request, "
        "SignedHeaders=x-amz-date;host, Signature=" + "0" * 64,  # not sorted
        "AWS4-HMAC-SHA256 Credential=AKIDAKIDAKIDAKID/20260101/us-east-1/s/aws4_request, "
        "SignedHeaders=host, Signature=" + "G" * 64,
        "AWS4-HMAC-SHA256 Credential=AKIDAKIDAKIDAKID/20260101/us-east-1/s/aws4_request, "
        "SignedHeaders=host, Signature=" + "0" * 64 + ", Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 " + "x" * 3000,
    ],
)
def test_malformed_authorization_headers(header: str) -> None:
    with pytest.raises(fmt.SigV4FormatError):
        fmt.parse_authorization(header)
