"""Liveness and readiness of the dependencies a request needs."""

from __future__ import annotations

from kms.errors import KmsError
from kms.services.ports import Hsm, Storage


class HealthService:
    def __init__(self, storage: Storage, hsm: Hsm) -> None:
        self._storage = storage
        self._hsm = hsm

    def worker_stats(self) -> dict[str, int]:
        """This process's HSM cache counters."""
        return self._hsm.cache_stats()

    def readiness(self) -> dict[str, str]:
        """``{"hsm": ..., "database": ...}``, each "ok" or the error code that check raised.
        The HSM check uses the token (not only cached session objects)."""
        report = {}
        for name, check in (("hsm", self._hsm.check), ("database", self._storage.check)):
            try:
                check()
                report[name] = "ok"
            except KmsError as e:
                report[name] = e.code
        return report
