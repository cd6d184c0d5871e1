"""Keyed context hashes: what the audit trail records of an encryption context.

A record never holds the context itself, only ``context_sha256``: since keyed hashes,
the HSM's HMAC-SHA256 of ``b"KMS-CONTEXT-1\\n"`` and the canonical encoding
(kms/formats/context.py). Unlike a plain SHA-256 it cannot be found by hashing guessed
contexts: computing it needs the HSM. Equal contexts still give equal hashes, so records
of one context can be matched, and the server answers an auditor who asks for the records
of a context (kms/services/audit_context.py).

Cost: one HSM call per context not in this process's memo (about 27 us on SoftHSM; a
network HSM costs a round trip), at most once per request item. The memo holds at most
MEMO_ENTRIES contexts of at most MEMO_MAX_BYTES encoded bytes each (a few MB at worst);
larger contexts are always sent to the HSM. A failing HSM raises its server error, so the
operation is refused (fail closed); a failure is never memoized.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

from kms.formats import context as ctxfmt
from kms.services.hsm_port import Hsm

MEMO_ENTRIES = 4096
MEMO_MAX_BYTES = 1024


class ContextHasher:
    """Keyed context hashes through the HSM, with a bounded per-process memo."""

    def __init__(self, hsm: Hsm, memo_entries: int = MEMO_ENTRIES) -> None:
        self._hsm = hsm
        self._entries = memo_entries
        self._memo: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def digest(self, context: Mapping[str, str]) -> str:
        """The hex keyed hash of a validated ``context``; equal contexts, equal hashes.
        Raises the HSM's server error (HsmUnavailable) if it cannot be computed."""
        data = ctxfmt.keyed_input(context)
        memoize = self._entries > 0 and len(data) <= MEMO_MAX_BYTES
        if memoize:
            with self._lock:
                found = self._memo.get(data)
                if found is not None:
                    self._memo.move_to_end(data)
                    return found
        value = self._hsm.mac(data).hex()
        if memoize:
            with self._lock:
                self._memo[data] = value
                while len(self._memo) > self._entries:
                    self._memo.popitem(last=False)
        return value

    def matching(self, context: Mapping[str, str]) -> tuple[str, ...]:
        """Every value a record of ``context`` can hold: the keyed hash, and the unkeyed
        SHA-256 that records written before keyed hashes hold."""
        return (self.digest(context), ctxfmt.digest(context))

    def memo_size(self) -> int:
        """How many contexts the memo holds now (at most ``memo_entries``)."""
        with self._lock:
            return len(self._memo)
