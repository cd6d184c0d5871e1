"""Liveness and readiness of the dependencies a request needs."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from kms.errors import KmsError
from kms.services.hsm_port import Hsm
from kms.services.ports import StorageUpkeep

log = logging.getLogger("kms.health")

# What the readiness probe asks the audit key to sign: a fixed, domain-separated digest
# that can never be the digest of a checkpoint (those hash a JSON object).
_PROBE_DIGEST = hashlib.sha256(b"keyholder-kms readiness probe v1").digest()


class HealthService:
    def __init__(
        self,
        storage: StorageUpkeep,
        hsm: Hsm,
        audit_anchor: Callable[[], None],
        sealed_state: Callable[[], object] = lambda: None,
    ) -> None:
        self._storage = storage
        self._hsm = hsm
        self._audit_anchor = audit_anchor
        self._sealed_state = sealed_state

    def storage_upkeep(self) -> None:
        """The database's routine upkeep outside any request (StorageUpkeep.checkpoint_wal);
        never raises."""
        self._storage.checkpoint_wal()

    def worker_stats(self) -> dict[str, int]:
        """This process's HSM cache counters."""
        return self._hsm.cache_stats()

    def readiness(self) -> dict[str, str]:
        """Each dependency a request needs, by name, with "ok" or the error code its check
        raised ("internal_error" for an unexpected exception, which is logged):

        - ``hsm``: a logged-in session can use the root key (touches the token, not only
          cached session objects);
        - ``database``: the database answers and its schema is current;
        - ``audit_signing_key``: the HSM's audit key signs (checkpoints need it);
        - ``audit_anchor``: the database's audit chain extends the head anchored in the
          HSM (kms/services/audit_anchor.py; ``audit_state_refused`` until an operator
          accepts a rolled-back or rewritten state);
        - ``sealed_state``: this process's index of current seals matches the HSM state
          anchor (kms/services/state_index.py; ``state_refused`` until an operator
          accepts a state whose sealed rows were rolled back, inserted or deleted).

        Never raises; every check runs even if an earlier one failed."""
        checks: tuple[tuple[str, Callable[[], object]], ...] = (
            ("hsm", self._hsm.check),
            ("database", self._storage.check),
            ("audit_signing_key", lambda: self._hsm.sign_digest(_PROBE_DIGEST)),
            ("audit_anchor", self._audit_anchor),
            ("sealed_state", self._sealed_state),
        )
        report = {}
        for name, check in checks:
            try:
                check()
                report[name] = "ok"
            except KmsError as e:
                report[name] = e.code
            except Exception:
                log.exception("readiness check failed", extra={"op": name})
                report[name] = "internal_error"
        return report
