"""The HTTP client. Configuration is checked at construction; the token never appears in
``repr``, exceptions or logs; every failure is a KmsClientError."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from kms.client.changes import ChangeCalls
from kms.client.errors import KmsClientError as KmsClientError  # (re-exported)


@dataclass(frozen=True)
class DataKey:
    key_id: str
    key_version: int
    ciphertext: bytes
    plaintext: bytes | None = field(default=None, repr=False)

    def __reduce__(self) -> Any:
        raise TypeError("a DataKey holds key material and cannot be pickled")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


class KmsClient(ChangeCalls):
    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 10.0,
        verify: bool | str = True,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise KmsClientError("invalid_config", "url must be http(s)://host[:port]")
        if not token or any(c.isspace() for c in token):
            raise KmsClientError("invalid_config", "token must be a non-empty string")
        if timeout <= 0:
            raise KmsClientError("invalid_config", "timeout must be positive")
        self._url = url.rstrip("/")
        self._timeout = timeout
        self._session = requests.Session()
        self._session.verify = verify
        self._session.headers["Authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:
        return f"KmsClient({self._url!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a KmsClient holds a credential and cannot be pickled")

    def close(self) -> None:
        self._session.close()

    # -- generic call -------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        """One API call; returns the decoded JSON answer or raises KmsClientError."""
        resp = self._send(method, path, body, params, stream=False)
        try:
            return resp.json()
        except ValueError:
            raise KmsClientError("bad_response", "the server did not answer JSON") from None

    def _send(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        params: Mapping[str, Any] | None,
        *,
        stream: bool,
    ) -> requests.Response:
        try:
            resp = self._session.request(
                method,
                self._url + path,
                json=body,
                params=params,
                timeout=self._timeout,
                stream=stream,
            )
        except requests.RequestException as e:
            raise KmsClientError("transport_error", type(e).__name__) from None
        if resp.status_code >= 400:
            try:
                data = resp.json()
            except ValueError:
                data = None
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise KmsClientError(
                str(err.get("code", "http_error")),
                str(err.get("message", f"HTTP {resp.status_code}")),
                status=resp.status_code,
                request_id=err.get("request_id"),
            )
        return resp

    # -- administration -----------------------------------------------------------------

    def create_principal(self, name: str, role: str) -> dict[str, Any]:
        """The new principal with its ``token`` (shown only here). Under dual control a
        service, requester or admin is a change: the answer is then the pending change,
        ``{"change", "message"}`` (pending_change tells; kms/client/changes.py)."""
        return dict(self.call("POST", "/v1/principals", {"name": name, "role": role}))

    def list_principals(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/v1/principals")["principals"])

    def disable_principal(self, name: str) -> dict[str, Any]:
        """The principal, disabled: its tokens, SigV4 credentials, certificate and
        dashboard sessions are refused from now on, on every node, and its dashboard
        sessions are ended (idempotent)."""
        return dict(self.call("POST", f"{_principal(name)}/disable", {}))

    def enable_principal(self, name: str) -> dict[str, Any]:
        """The principal, enabled again (idempotent); its unexpired tokens work again,
        its dashboard sessions stay ended."""
        return dict(self.call("POST", f"{_principal(name)}/enable", {}))

    def end_sessions(self, name: str) -> dict[str, Any]:
        """The principal; its dashboard sessions opened until now are ended."""
        return dict(self.call("POST", f"{_principal(name)}/sessions/end", {}))

    def list_tokens(self, name: str) -> list[dict[str, Any]]:
        """The principal's tokens, oldest first, by id (``token_id``, ``created_at``,
        ``expires_at``, ``last_used_at``); never the tokens themselves."""
        return list(self.call("GET", f"{_principal(name)}/tokens")["tokens"])

    def issue_token(self, name: str, ttl_seconds: int | None = None) -> dict[str, Any]:
        """A new token for the principal: the answer's ``token`` is shown only here. It
        expires after ``ttl_seconds`` (60 s to 10 years), or the role's maximum
        (KMS_TOKEN_MAX_LIFETIME) if that is shorter; without either, never. A token for
        another principal is a change under dual control: the answer is then the pending
        change (pending_change tells)."""
        body = {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}
        return dict(self.call("POST", f"{_principal(name)}/tokens", body))

    def rotate_token(
        self, name: str, token_id: str, grace_seconds: int = 0, ttl_seconds: int | None = None
    ) -> dict[str, Any]:
        """A new token replacing ``token_id`` (``replaces``); the old one expires
        ``grace_seconds`` from now (0: at once). The new ``token`` is shown only here.
        Another principal's token is a change under dual control (see issue_token)."""
        body: dict[str, Any] = {"grace_seconds": grace_seconds}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        path = f"{_principal(name)}/tokens/{quote(token_id, safe='')}/rotate"
        return dict(self.call("POST", path, body))

    def revoke_token(self, name: str, token_id: str) -> dict[str, Any]:
        """Revoke one token of the principal at once: ``{token_id, state: "revoked"}``."""
        path = f"{_principal(name)}/tokens/{quote(token_id, safe='')}"
        return dict(self.call("DELETE", path))

    def create_key(self, alias: str | None = None, description: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"description": description}
        if alias is not None:
            body["alias"] = alias
        return dict(self.call("POST", "/v1/keys", body))

    def list_keys(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/v1/keys")["keys"])

    def get_key(self, ref: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/keys/{_ref(ref)}"))

    def key_action(
        self, ref: str, action: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """rotate, disable, enable, schedule-deletion, cancel-deletion. Under dual control
        schedule-deletion is a change: the answer is then the pending change
        (pending_change tells)."""
        return dict(self.call("POST", f"/v1/keys/{_ref(ref)}/{action}", body or {}))

    def configure_key(self, ref: str, **settings: int | None) -> dict[str, Any]:
        """rotation_period_days (None: off) and/or min_decryption_version."""
        return dict(self.call("POST", f"/v1/keys/{_ref(ref)}/config", settings))

    def key_usage(self, ref: str, days: int = 30) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/keys/{_ref(ref)}/usage?days={int(days)}"))

    def grant(self, ref: str, principal: str, operations: list[str]) -> dict[str, Any]:
        """Set the principal's grant on the key: ``{principal, operations,
        justifications}``. Under dual control a grant of datakey, decrypt or xks_decrypt
        is a change: the answer is then the pending change (pending_change tells)."""
        return dict(
            self.call(
                "POST",
                f"/v1/keys/{_ref(ref)}/grants",
                {"principal": principal, "operations": operations},
            )
        )

    def audit(self, after: int = 0, limit: int = 100, **filters: str) -> list[dict[str, Any]]:
        """One page of audit records; filters: key_id, principal, operation, outcome,
        case_id, since, until (ISO 8601)."""
        params = {"after": after, "limit": limit, **filters}
        return list(self.call("GET", "/v1/audit", params=params)["records"])

    def audit_by_context(
        self, context: Mapping[str, str], after: int = 0, limit: int = 100, **filters: str
    ) -> list[dict[str, Any]]:
        """One page of the records of an encryption context (the server matches its keyed
        hash, and records the query); filters as for audit()."""
        body = {"context": dict(context), "after": after, "limit": limit, **filters}
        return list(self.call("POST", "/v1/audit/context", body)["records"])

    def audit_checkpoints(self, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        params = {"after": after, "limit": limit}
        return list(self.call("GET", "/v1/audit/checkpoints", params=params)["checkpoints"])

    def create_checkpoint(self) -> dict[str, Any]:
        return dict(self.call("POST", "/v1/audit/checkpoints", {}))

    def audit_public_key(self) -> bytes:
        return self._send("GET", "/v1/audit/public-key", None, None, stream=False).content

    def export_audit(self, after: int | None = None, until: int | None = None) -> Iterator[bytes]:
        """The bundle's lines (newline-terminated bytes), streamed."""
        params = {k: v for k, v in (("after", after), ("until", until)) if v is not None}
        resp = self._send("GET", "/v1/audit/export", None, params, stream=True)
        try:
            for line in resp.iter_lines():
                yield line + b"\n"
        except requests.RequestException as e:
            raise KmsClientError("transport_error", type(e).__name__) from None
        finally:
            resp.close()

    def audit_report(self, since: str, until: str, fmt: str = "json") -> Any:
        """The compliance report: a dict for json, CSV text for csv."""
        params = {"since": since, "until": until, "format": fmt}
        if fmt == "json":
            return self.call("GET", "/v1/audit/report", params=params)
        return self._send("GET", "/v1/audit/report", None, params, stream=False).text

    # -- data keys ------------------------------------------------------------------------

    def datakey(self, key: str, context: Mapping[str, str] | None = None) -> DataKey:
        """A new DEK: plaintext for local use now, ciphertext to store beside the data."""
        data = self.call("POST", f"/v1/keys/{_ref(key)}/datakey", {"context": dict(context or {})})
        return DataKey(
            data["key_id"],
            data["key_version"],
            _unb64(data["ciphertext"]),
            _unb64(data["plaintext"]),
        )

    def encrypt(
        self, key: str, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> bytes:
        data = self.call(
            "POST",
            f"/v1/keys/{_ref(key)}/encrypt",
            {"plaintext": _b64(plaintext), "context": dict(context or {})},
        )
        return _unb64(data["ciphertext"])

    def decrypt(
        self,
        ciphertext: bytes,
        context: Mapping[str, str] | None = None,
        justification: str | None = None,
        *,
        reference: str | None = None,
        case_id: str | None = None,
    ) -> bytes:
        """Unwrap a blob. ``justification`` defaults to service_processing on the server;
        a requester passes the ``case_id`` of an active escrow case."""
        body: dict[str, Any] = {"ciphertext": _b64(ciphertext), "context": dict(context or {})}
        for name, value in (
            ("justification", justification),
            ("reference", reference),
            ("case_id", case_id),
        ):
            if value is not None:
                body[name] = value
        return _unb64(self.call("POST", "/v1/decrypt", body)["plaintext"])

    # -- escrow ---------------------------------------------------------------------------

    def register_custodian(
        self,
        name: str,
        group: str,
        public_key: bytes,
        endorsement: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """``endorsement``: ``{"custodian", "signature"}`` from a member of the group. A
        change under dual control: the answer is then the pending change (pending_change
        tells)."""
        body: dict[str, Any] = {"name": name, "group": group, "public_key": _b64(public_key)}
        if endorsement is not None:
            body["endorsement"] = dict(endorsement)
        return dict(self.call("POST", "/v1/custodians", body))

    def revoke_custodian(self, name: str) -> dict[str, Any]:
        """``{name, state: "revoked"}``; under dual control the pending change."""
        return dict(self.call("DELETE", f"/v1/custodians/{quote(name, safe='')}"))

    def file_case(self, case: Mapping[str, Any]) -> dict[str, Any]:
        """``{legal_basis, reference, justification, scope: {keys, context?, blobs?},
        max_unwraps, expires_in_seconds}``; blobs as base64."""
        return dict(self.call("POST", "/v1/escrow/cases", case))

    def amend_case(self, case_id: str, case: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.call("PUT", f"/v1/escrow/cases/{_ref(case_id)}", case))

    def get_case(self, case_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/escrow/cases/{_ref(case_id)}"))

    def decide_case(
        self, case_id: str, custodian: str, signature: bytes, decision: str = "approve"
    ) -> dict[str, Any]:
        path = "approvals" if decision == "approve" else "rejections"
        body = {"custodian": custodian, "signature": _b64(signature)}
        return dict(self.call("POST", f"/v1/escrow/cases/{_ref(case_id)}/{path}", body))

    def end_case(self, case_id: str, action: str) -> dict[str, Any]:
        """``revoke`` or ``close``."""
        return dict(self.call("POST", f"/v1/escrow/cases/{_ref(case_id)}/{action}", {}))

    def rewrap(
        self,
        ciphertext: bytes,
        context: Mapping[str, str] | None = None,
        destination_key: str | None = None,
    ) -> bytes:
        body: dict[str, Any] = {"ciphertext": _b64(ciphertext), "context": dict(context or {})}
        if destination_key is not None:
            body["destination_key"] = destination_key
        return _unb64(self.call("POST", "/v1/rewrap", body)["ciphertext"])


def _ref(ref: str) -> str:
    return quote(ref, safe="/")


def _principal(name: str) -> str:
    return "/v1/principals/" + quote(name, safe="")
