"""HTTP delivery of webhook notifications (the WebhookSender port)."""

from __future__ import annotations

import requests

from kms.services.notify import WebhookError, WebhookReply


class RequestsWebhookSender:
    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = timeout
        self._session = requests.Session()

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> WebhookReply:
        try:
            response = self._session.post(
                url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            )
        except requests.RequestException as e:
            raise WebhookError(type(e).__name__) from None
        response.close()
        return WebhookReply(response.status_code, response.headers.get("X-KMS-Ack"))
