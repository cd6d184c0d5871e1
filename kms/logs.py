"""Structured logs: one JSON object per line on stderr.

Only what callers pass in ``extra`` with known-safe names is emitted; request bodies,
headers, tokens, PINs and key material are never logged.
"""

from __future__ import annotations

import json
import logging
from typing import Any

_SAFE_EXTRA = (
    "request_id", "principal", "method", "path", "status", "ms", "code", "detail",
    "error", "attempt", "op",
)  # fmt: skip


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for name in _SAFE_EXTRA:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and where it came from, not its arguments.
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, default=str)


def configure(level: str) -> None:
    """Send the ``kms`` loggers to stderr as JSON lines (idempotent)."""
    logger = logging.getLogger("kms")
    logger.setLevel(level)
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.propagate = False
