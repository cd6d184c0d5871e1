"""Dashboard sessions: a signed cookie holding who logged in, when, and a CSRF token.

- The signing key is an HMAC made inside the HSM (DashboardService.session_secret),
  derived on first use in each process, so it exists only after fork, every worker and
  node sharing the token agrees on it, and nothing is stored on disk.
- The cookie is ``kms_dashboard``, path ``/dashboard``, HttpOnly, SameSite=Strict and
  Secure (KMS_DASHBOARD_SECURE_COOKIE), a browser-session cookie. Only the
  principal's name and role, the login time and the CSRF token are in it, never the
  bearer token. Lifetime is absolute (KMS_DASHBOARD_SESSION_SECONDS from login), checked
  on every request; the principal is re-read on every request, so a removed principal or
  changed role ends the session at once.
- Requests outside ``/dashboard`` get no session (and never touch the HSM for it).
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Callable
from typing import Any

from flask import Flask, Request, session
from flask.sessions import NullSession, SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer

from kms.errors import KmsError

PREFIX = "/dashboard"
COOKIE = "kms_dashboard"
CSRF_FIELD = "csrf_token"


class DashboardSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, scoped to the dashboard, with an HSM-made key."""

    def __init__(self, secret: Callable[[], bytes], secure: bool) -> None:
        self._secret = secret
        self._key: bytes | None = None
        self._lock = threading.Lock()
        self._secure = secure

    def _signing_key(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = self._secret()
            return self._key

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        try:
            key = self._signing_key()
        except KmsError:  # HSM down: no session; the dashboard answers 503
            return None
        return URLSafeTimedSerializer(
            key,
            salt=self.salt,
            serializer=self.serializer,
            signer_kwargs={
                "key_derivation": self.key_derivation,
                "digest_method": self.digest_method,
            },
        )

    def open_session(self, app: Flask, request: Request) -> Any:
        if request.path != PREFIX and not request.path.startswith(PREFIX + "/"):
            return None  # Flask substitutes a NullSession
        return super().open_session(app, request)

    def get_cookie_name(self, app: Flask) -> str:
        return COOKIE

    def get_cookie_path(self, app: Flask) -> str:
        return PREFIX

    def get_cookie_domain(self, app: Flask) -> str | None:
        return None  # host-only

    def get_cookie_httponly(self, app: Flask) -> bool:
        return True

    def get_cookie_secure(self, app: Flask) -> bool:
        return self._secure

    def get_cookie_samesite(self, app: Flask) -> str:
        return "Strict"


def available() -> bool:
    """Whether this request has a usable session (False when the key could not be made)."""
    return not isinstance(session, NullSession)


def csrf_token() -> str:
    """The session's CSRF token, made on first use (also before login)."""
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def csrf_problem(sent: str | None) -> str | None:
    """None if ``sent`` is the session's CSRF token; otherwise why not."""
    expected = session.get("csrf")
    if not sent:
        return "missing"
    if not isinstance(expected, str) or not expected:
        return "no token in the session"
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        return "mismatch"
    return None
