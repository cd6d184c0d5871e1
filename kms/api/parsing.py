"""Strict JSON request parsing: unknown fields, wrong types, bad base64 and oversized values
are InvalidRequest (400) naming the field; nothing reaches a service unchecked."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from flask import request

from kms.errors import InvalidRequest, KmsError, PayloadTooLarge
from kms.formats import context as ctxfmt

Body = dict[str, Any]


def json_body(allowed: set[str], required: frozenset[str] = frozenset()) -> Body:
    """The request's JSON object. An empty body counts as ``{}``."""
    if request.content_length is not None and request.content_length > (
        request.max_content_length or 0
    ):
        raise PayloadTooLarge()
    raw = request.get_data(cache=False)
    if not raw:
        data: Any = {}
    else:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise InvalidRequest("the body is not valid JSON") from None
    return fields(data, allowed, required, where="body")


def fields(data: Any, allowed: set[str], required: frozenset[str], where: str) -> Body:
    if not isinstance(data, dict):
        raise InvalidRequest(f"{where} must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidRequest(f"{where}: unknown field(s): {', '.join(unknown)[:200]}")
    missing = sorted(required - set(data))
    if missing:
        raise InvalidRequest(f"{where}: missing field(s): {', '.join(missing)}")
    return data


def string(data: Body, name: str, *, max_len: int, default: str | None = None) -> str | None:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string")
    if len(value) > max_len:
        raise InvalidRequest(f"{name} must be at most {max_len} characters")
    check_text(value, name)
    return value


def check_text(value: str, name: str) -> None:
    """Refuse strings that are not valid Unicode text (lone surrogates, NUL)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{name} must be valid UTF-8 text") from None
    if _CONTROL.search(value):
        raise InvalidRequest(f"{name} must not contain control characters")


# C0 (but tab and newline), DEL and C1: characters a terminal may act on
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def required_string(data: Body, name: str, *, max_len: int) -> str:
    value = string(data, name, max_len=max_len)
    if value is None:
        raise InvalidRequest(f"{name} is required")
    return value


def boolean(data: Body, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false")
    return value


def integer(data: Body, name: str, within: tuple[int, int] | None = None) -> int:
    """An integer (not a bool or float), in the closed range ``within`` if given."""
    value = data.get(name)
    if type(value) is not int:
        raise InvalidRequest(f"{name} must be an integer")
    if within is not None and not within[0] <= value <= within[1]:
        raise InvalidRequest(f"{name} must be between {within[0]} and {within[1]}")
    return value


def b64(
    data: Body, name: str, *, max_bytes: int, too_big: type[KmsError] = InvalidRequest
) -> bytes:
    """Standard base64 (with padding) of at most ``max_bytes`` decoded bytes; more is
    refused with ``too_big`` (checked on the text before decoding, and after)."""
    value = data.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a base64 string")
    if len(value) > 4 * (max_bytes // 3 + 1):
        raise too_big(f"{name} must be at most {max_bytes} bytes")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{name} is not valid base64") from None
    if len(decoded) > max_bytes:
        raise too_big(f"{name} must be at most {max_bytes} bytes")
    return decoded


def context(data: Body) -> dict[str, str]:
    try:
        return ctxfmt.validate(data.get("context"))
    except ctxfmt.ContextError as e:
        raise InvalidRequest(str(e)) from None


def string_list(data: Body, name: str, *, max_items: int) -> list[str]:
    value = data.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{name} must be a list of strings")
    if len(value) > max_items:
        raise InvalidRequest(f"{name} has more than {max_items} items")
    for item in value:
        if len(item) > 4 * 4096:
            raise InvalidRequest(f"{name} holds an oversized item")
        check_text(item, name)
    return value


def query_int(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,18}", raw):
        raise InvalidRequest(f"{name} must be a non-negative integer")
    return int(raw)


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_signature(text: str) -> bytes:
    """A base64 Ed25519 signature (64 bytes)."""
    try:
        sig = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("signature must be base64") from None
    if len(sig) != 64:
        raise InvalidRequest("signature must be a 64-byte Ed25519 signature")
    return sig
