"""The AWS KMS JSON API subset: ``POST /`` with ``X-Amz-Target: TrentService.<Op>``,
``Content-Type: application/x-amz-json-1.1`` and a SigV4 signature for service ``kms``.

A thin adapter over the services (operations in kms/api/aws_ops.py and
kms/api/aws_key_ops.py, errors in kms/api/aws_errors.py). Each call runs as the native
operation it maps to (``g.operation``: datakey, decrypt, create_key ...), so it leaves the
same single audit record and metrics label as the native API would.

Order of checks: operation name, body size (64 KiB; nothing is audited before the
signature is checked), SigV4 (the scope's region must be KMS_AWS_REGION, and
``Content-Type`` and ``X-Amz-Target`` must be among the signed headers, as botocore signs
them: they choose the operation and how the body is read, so an unsigned one could be
changed in flight), content type, JSON, fields, then the service.
"""

from __future__ import annotations

import json
from typing import cast

from flask import Blueprint, Flask, Response, g, request
from flask.sansio.blueprints import BlueprintSetupState

from kms.api import (
    aws_errors,
    aws_key_ops,  # noqa: F401 (registers the key operations)
)
from kms.api import aws_shapes as s
from kms.api import parsing as p
from kms.api.aws_errors import CONTENT_TYPE, Serialization, UnknownOperation, Validation
from kms.api.aws_ops import OPERATIONS, Face, face
from kms.api.context import audited
from kms.api.sigv4 import authenticate
from kms.api.throttle import admit

bp = Blueprint("aws_kms", __name__)
aws_errors.register(bp)
MAX_BODY = 64 * 1024
SIGNED = ("content-type", "x-amz-target")  # besides host and x-amz-date


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    app = cast(Flask, state.app)
    app.extensions["kms_aws"] = Face(
        s.Arns.from_settings(state.options.get("settings")), app.extensions["kms"].aws
    )


@bp.post("/")
def dispatch() -> Response:
    target = request.headers.get("X-Amz-Target", "")
    service, _, name = target.partition(".")
    found = OPERATIONS.get(name) if service == "TrentService" else None
    if found is None:
        raise UnknownOperation(f"unknown operation {target[:100]!r}")
    request.max_content_length = min(MAX_BODY, request.max_content_length or MAX_BODY)
    raw = request.get_data(cache=True)  # 413 -> ValidationException, before any audit
    g.operation = found.native
    verified = authenticate("kms", face().arns.region, signed=SIGNED)
    with audited(found.native, aws_errors.http_error):
        admit(verified.principal)  # 429 over the principal's rate limit
        if request.mimetype != CONTENT_TYPE:
            raise Validation(f"Content-Type must be {CONTENT_TYPE}")
        body = _json(raw)
        p.fields(body, set(found.allowed), found.required, "body")
        return aws_errors.aws_response(found.handler(body, face()))


def _json(raw: bytes) -> p.Body:
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise Serialization("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Serialization("the body must be a JSON object")
    return data
