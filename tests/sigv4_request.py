"""One freshly signed AWS KMS JSON API request (botocore's own SigV4 signer), for tests
that send it through the Flask test client or to a real server."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any
from unittest import mock

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def signed(
    akid: str,
    secret: str,
    base_url: str = "http://localhost",
    target: str = "TrentService.CreateKey",
    body: dict[str, Any] | None = None,
    when: datetime | None = None,
) -> tuple[dict[str, str], bytes]:
    """(headers, body) of a request to ``base_url + "/"`` signed now (or at ``when``); a
    signed nonce header makes every call distinct (the same signature twice is a replay,
    which the AWS face answers with ThrottlingException)."""
    data = json.dumps(body or {}).encode()
    request = AWSRequest(
        method="POST",
        url=base_url + "/",
        data=data,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": target,
            "X-Client-Nonce": uuid.uuid4().hex,
        },
    )
    signer = SigV4Auth(Credentials(akid, secret), "kms", "us-east-1")
    if when is None:
        signer.add_auth(request)
    else:  # botocore reads the time through this function
        with mock.patch("botocore.auth.get_current_datetime", lambda: when):
            signer.add_auth(request)
    return dict(request.headers.items()), data
