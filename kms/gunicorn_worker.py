"""The gunicorn worker class of the KMS (``worker_class`` in deploy/gunicorn.conf.py).

It is gunicorn's sync worker with one change, for requests that outlive the worker
``timeout``. A sync worker serves one request at a time and tells the master it is alive
only between requests; when a request runs longer than ``timeout`` (a client that sends
its body or headers too slowly, or a call that hangs), the master aborts the worker
(SIGABRT, then SIGKILL) and starts a new one. The stock worker then answers the aborted
request ``500 Internal Server Error`` and logs a traceback, as if the KMS had failed. This
worker instead closes that connection without an answer (like a killed worker: the client
cannot tell whether a request that was past its parsing took effect, and must not be told
it failed) and logs one line saying where the request was, e.g. still reading the body.

Nothing else changes: the mutual TLS identity needs no worker support (kms/api/peer.py
reads the verified certificate from ``environ["gunicorn.socket"]``).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from gunicorn.workers.sync import SyncWorker  # type: ignore[import-untyped]


class KmsSyncWorker(SyncWorker):  # type: ignore[misc]
    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """As gunicorn's, except that a request cut short by the worker timeout (or an
        immediate shutdown) gets no answer and a one-line log instead of a 500 and a
        traceback."""
        if not isinstance(exc, SystemExit) or self.alive:
            super().handle_error(req, client, addr, exc)
            return
        frames = traceback.extract_tb(exc.__traceback__)
        inner = [f for f in frames if not f.filename.endswith(("workers/base.py", __file__))]
        where = f"{Path(inner[-1].filename).name}:{inner[-1].lineno}" if inner else "?"
        self.log.warning(
            "%s: closed %s %s without an answer (still running at %s)",
            f"worker timeout ({self.cfg.timeout} s)" if exc.code == 1 else "immediate shutdown",
            getattr(req, "method", "-"),
            getattr(req, "path", "-"),
            where,
        )
