"""The SDK's one error type."""

from __future__ import annotations


class KmsClientError(Exception):
    """Any failure of the SDK: ``code`` is the server's stable error code (or a local one
    such as ``transport_error`` or ``decryption_failed``)."""

    def __init__(
        self, code: str, message: str, *, status: int | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(f"{code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id
