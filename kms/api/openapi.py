"""``GET /v1/openapi.json``: the OpenAPI 3.1 document of the native v1 API.

The document is the file ``kms/api/openapi.json`` (package data), read once at import.
It is public (no token): it describes the API, not the deployment. tests/e2e/test_openapi.py
checks it against the Flask routes and against a running server.
"""

from __future__ import annotations

from importlib.resources import files

from flask import Blueprint, Response

bp = Blueprint("openapi", __name__, url_prefix="/v1")

DOCUMENT = files("kms.api").joinpath("openapi.json").read_bytes()


@bp.get("/openapi.json")
def openapi() -> Response:
    return Response(DOCUMENT, mimetype="application/json")
