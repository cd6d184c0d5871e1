"""The audit chain's anchor in the HSM: the newest head the signer vouched for, kept where
whoever writes the database, its backups or the server's files cannot move it.

The anchor is a private token object (kms/backends/hsm/pkcs11_anchors.py) labelled
``kms-audit-anchor-<chain id>``; the chain id is in the database (audit_head.chain_id),
its value is kms/formats/anchor.py.

Guarantees:
- A checkpoint is signed only for a head that extends the anchor: the record at the
  anchored seq must still re-hash to the anchored hash, and every record up to the new
  head must link to the one before (a process's first check re-hashes them all too; see
  check_extends). The anchor then moves to the new head before the checkpoint is stored.
- A database that is behind the anchor, or does not contain it (a rollback, a restore
  from an older backup, a history deleted and re-chained), is refused: no audited
  operation runs until an operator accepts the state with ``kms audit accept-state``,
  which is itself chained and re-anchors at the head that includes its record.
- Nothing here creates an anchor by itself: ``kms init`` anchors a database that has no
  chain id yet, and only while the token holds no other chain's anchor; everything else
  goes through accept-state.
- Updates are crash-safe without a transaction across HSM and database: a new object is
  created before the old one is destroyed, and of several objects (a crash or a race
  between two signers in between) the highest seq is the anchor.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from kms.errors import AuditStateRefused
from kms.formats import audit_record
from kms.formats.anchor import Anchor, AnchorError, decode
from kms.services.hsm_port import Hsm
from kms.services.model import AuditHead
from kms.services.ports import AuditRows

LABEL_PREFIX = "kms-audit-anchor-"
PAGE = 1000


def refused(reason: str) -> AuditStateRefused:
    return AuditStateRefused(detail=reason)


@dataclass(frozen=True)
class AnchorCheck:
    """A chain head that extends its HSM anchor."""

    chain_id: str
    anchor: Anchor
    head: AuditHead


class AuditAnchor:
    def __init__(self, hsm: Hsm) -> None:
        self._hsm = hsm

    @staticmethod
    def label(chain_id: str) -> str:
        return LABEL_PREFIX + chain_id

    def read(self, chain_id: str) -> Anchor:
        """The anchor of ``chain_id``; AuditStateRefused if the token holds none or an
        unreadable one (never a new one), HsmUnavailable if the HSM cannot be asked."""
        values = self._hsm.anchor_values(self.label(chain_id))
        if not values:
            raise refused(f"the HSM holds no anchor for audit chain {chain_id}")
        try:
            return max(decode(v) for v in values)
        except AnchorError as e:
            raise refused(f"the HSM anchor of audit chain {chain_id} is unreadable: {e}") from e

    def verify(
        self, tx: AuditRows, chain_id: str | None = None, rehash: bool = True
    ) -> AnchorCheck:
        """Check inside ``tx`` that the database's chain extends its HSM anchor; raise
        AuditStateRefused with the precise reason otherwise (check_extends says how deep,
        with ``rehash``). The anchor is read before ``tx``'s head: a reader whose snapshot
        started earlier could see an older head than a concurrent signer anchored, so a
        reader passes ``chain_id`` (read before ``tx`` began) and lets this method make
        ``tx``'s first read."""
        chain_id = chain_id or tx.audit_chain_id()
        if chain_id is None:
            raise refused("this database's audit chain is not anchored in the HSM (kms init)")
        anchor = self.read(chain_id)
        head = tx.audit_head()
        check_extends(tx, anchor, head, rehash)
        return AnchorCheck(chain_id, anchor, head)

    def advance(self, chain_id: str, new: Anchor) -> None:
        """Move the anchor forward to ``new`` (a head just verified to extend it). A no-op
        if another signer already anchored this seq or a later one."""
        label = self.label(chain_id)
        try:
            current = [decode(v) for v in self._hsm.anchor_values(label)]
        except AnchorError as e:
            raise refused(f"the HSM anchor of audit chain {chain_id} is unreadable: {e}") from e
        if not current:
            raise refused(f"the HSM holds no anchor for audit chain {chain_id}")
        if max(current).seq >= new.seq:
            return
        self._hsm.add_anchor(label, new.encode())
        for old in current:
            self._hsm.drop_anchor(label, old.encode())

    def other_chains(self, chain_id: str | None) -> list[str]:
        """Labels of anchors in the token for chains other than ``chain_id``."""
        own = self.label(chain_id) if chain_id else None
        return [label for label in self._hsm.anchor_labels(LABEL_PREFIX) if label != own]

    def anchor_new_chain(self, tx: AuditRows) -> str:
        """Give the database (inside ``tx``, which has no chain id yet) a chain id and
        anchor its current head; returns the chain id. The caller commits ``tx`` only
        if this returns, so a database never names an anchor that was not created."""
        chain_id = secrets.token_hex(16)
        head = tx.audit_head()
        tx.set_audit_chain_id(chain_id)
        anchor = Anchor(head.seq, head.hash, head.archived_seq)
        self._hsm.add_anchor(self.label(chain_id), anchor.encode())
        return chain_id

    def replace(self, chain_id: str, new: Anchor) -> None:
        """Make ``new`` the only anchor of ``chain_id`` whatever the token held (the
        operator's accept-state; nothing else replaces an anchor backwards)."""
        label = self.label(chain_id)
        old = self._hsm.anchor_values(label)
        self._hsm.add_anchor(label, new.encode())
        for value in old:
            if value != new.encode():
                self._hsm.drop_anchor(label, value)


def check_extends(tx: AuditRows, anchor: Anchor, head: AuditHead, rehash: bool = True) -> None:
    """Raise AuditStateRefused unless the chain stored in ``tx`` runs unbroken from
    ``anchor`` to ``head``: the record at ``anchor.seq`` re-hashes to the anchored hash,
    and every later record links to the one before. With ``rehash`` every later record is
    re-hashed from its content too (a process's first check); without (each checkpoint,
    readiness), a record whose content was edited but whose stored hash was kept is left
    to the offline verifier, which re-hashes everything: re-hashing a thousand records
    at every checkpoint cost batch requests a tenth of their throughput. Either way a
    history deleted, re-chained or rolled back cannot pass: it does not contain the
    anchored record, or its links or head do not match."""
    if head.seq < anchor.seq:
        raise refused(
            f"the database's audit head (seq {head.seq}) is behind the HSM anchor "
            f"(seq {anchor.seq}): a rollback or a restore from an older backup"
        )
    if head.archived_seq != anchor.archived:
        raise refused(
            f"the database says records up to seq {head.archived_seq} were archived, the HSM "
            f"anchor says up to seq {anchor.archived}: signed history was deleted"
        )
    prev = anchor.hash
    if anchor.seq > head.archived_seq:
        at = tx.audit_records(anchor.seq - 1, 1, until=anchor.seq)
        if not at or _hash_of(at[0]) != anchor.hash:
            raise refused(
                f"the database's audit chain does not contain the HSM anchor (seq "
                f"{anchor.seq}): its history was rewritten or replaced"
            )
    cursor = anchor.seq
    while cursor < head.seq:
        try:
            if rehash:
                page = tx.audit_records(cursor, PAGE, until=head.seq)
                prev = audit_record.verify_chain(page, prev_hash=prev, first_seq=cursor + 1)
                links = [(r["seq"], r["prev_hash"], r["hash"]) for r in page]
            else:
                links = tx.audit_links(cursor, head.seq, PAGE)
                prev = _linked(links, prev, cursor + 1)
        except audit_record.ChainError as e:
            raise refused(
                f"the chain after the HSM anchor (seq {anchor.seq}) is broken: {e}"
            ) from e
        if not links:
            break
        cursor = links[-1][0]
    if cursor != head.seq or prev != head.hash:
        raise refused(
            f"the audit head row (seq {head.seq}) does not match the records after the "
            f"HSM anchor (seq {anchor.seq})"
        )


def _linked(links: list[tuple[int, str, str]], prev_hash: str, first_seq: int) -> str:
    """The stored hash of the last of ``links`` (seq, prev_hash, hash) if each follows the
    one before; ChainError at the first that does not."""
    for expected, (seq, prev, hash_) in enumerate(links, start=first_seq):
        if seq != expected:
            raise audit_record.ChainError(expected, f"found seq {seq}")
        if prev != prev_hash:
            raise audit_record.ChainError(expected, "prev_hash does not match the previous record")
        prev_hash = hash_
    return prev_hash


def _hash_of(record: dict[str, object]) -> str | None:
    """The record's hash recomputed from its content (None if it is not a record)."""
    try:
        return audit_record.verify_chain(
            [record], str(record["prev_hash"]), int(str(record["seq"]))
        )
    except (audit_record.ChainError, KeyError, ValueError):
        return None
