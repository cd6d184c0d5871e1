"""AWS Signature Version 4 (header form), as the XKS proxy API and the AWS KMS JSON API use.

Wire format of the ``Authorization`` header (one space after the algorithm, then
comma-separated parameters, in any order, with optional spaces)::

    AWS4-HMAC-SHA256 Credential=<access key id>/<yyyymmdd>/<region>/<service>/aws4_request,
        SignedHeaders=<lowercase names joined by ';'>, Signature=<64 hex digits>

The request also carries ``X-Amz-Date: yyyymmddThhmmssZ``. The signature is
``HMAC-SHA256(signing key, string to sign)`` in hex, where::

    canonical request = method \\n canonical URI \\n canonical query \\n
                        name:value\\n for each signed header, sorted \\n
                        signed header names \\n hex SHA-256 of the raw body
    string to sign    = "AWS4-HMAC-SHA256" \\n X-Amz-Date \\n
                        <date>/<region>/<service>/aws4_request \\n hex SHA-256(canonical request)
    signing key       = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service),
                             "aws4_request")

The canonical URI is the path as sent, URI-encoded once more except ``/`` and ``~`` (what
botocore does for every service but S3); header values are trimmed with inner runs of
spaces collapsed; whatever headers the client listed are signed (the host header includes
the port when the client used one). Parsing raises SigV4FormatError with a reason; this
module never sees a secret except as the argument of ``signature``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_HEADER = 2048
_CREDENTIAL = re.compile(
    r"(?P<akid>[A-Za-z0-9]{16,128})/(?P<date>\d{8})/(?P<region>[a-z0-9-]{1,32})"
    r"/(?P<service>[a-z0-9-]{1,32})/aws4_request"
)
_HEADER_NAME = re.compile(r"[a-z0-9-]{1,64}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
AMZ_DATE = re.compile(r"\d{8}T\d{6}Z")
# What an AWS region looks like (us-east-1, eu-west-3, us-gov-west-1), for settings that
# pin the region of a credential scope.
REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")


class SigV4FormatError(ValueError):
    """The Authorization header or X-Amz-Date is not well-formed; str() says why."""


@dataclass(frozen=True)
class Authorization:
    access_key_id: str
    date: str  # yyyymmdd of the credential scope
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


def parse_authorization(header: str) -> Authorization:
    """The parts of an ``Authorization`` header; SigV4FormatError if malformed."""
    if len(header) > MAX_HEADER:
        raise SigV4FormatError("authorization header too long")
    algorithm, _, rest = header.partition(" ")
    if algorithm != ALGORITHM:
        raise SigV4FormatError("not an AWS4-HMAC-SHA256 authorization")
    params: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name in params:
            raise SigV4FormatError("malformed authorization parameters")
        params[name] = value
    if set(params) != {"Credential", "SignedHeaders", "Signature"}:
        raise SigV4FormatError("authorization needs Credential, SignedHeaders and Signature")
    cred = _CREDENTIAL.fullmatch(params["Credential"])
    if cred is None:
        raise SigV4FormatError("malformed credential scope")
    names = tuple(params["SignedHeaders"].split(";"))
    if not all(_HEADER_NAME.fullmatch(n) for n in names) or list(names) != sorted(set(names)):
        raise SigV4FormatError("SignedHeaders must be sorted, lowercase, without duplicates")
    if not _SIGNATURE.fullmatch(params["Signature"]):
        raise SigV4FormatError("signature must be 64 lowercase hex digits")
    return Authorization(
        cred["akid"], cred["date"], cred["region"], cred["service"], names, params["Signature"]
    )


def canonical_uri(raw_path: str) -> str:
    return quote(raw_path or "/", safe="/~")


def canonical_query(raw_query: str) -> str:
    pairs = parse_qsl(raw_query, keep_blank_values=True)
    encoded = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _header_value(value: str) -> str:
    return " ".join(value.strip().split())


def canonical_request(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    signed_headers: tuple[str, ...],
    body: bytes,
) -> str:
    """The canonical request; ``headers`` maps lowercase names to values and must hold
    every signed header (KeyError otherwise)."""
    lines = "".join(f"{name}:{_header_value(headers[name])}\n" for name in signed_headers)
    return "\n".join(
        [
            method.upper(),
            canonical_uri(raw_path),
            canonical_query(raw_query),
            lines,
            ";".join(signed_headers),
            hashlib.sha256(body).hexdigest(),
        ]
    )


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    return "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()]
    )


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode("utf-8")
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def signature(key: bytes, to_sign: str) -> str:
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
