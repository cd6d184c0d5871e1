"""Offline verification of an audit bundle: no server, database or HSM needed.

Given the bundle and the audit public key the auditor trusts, it recomputes the hash
chain and checks every checkpoint signature, and says precisely what is wrong and where:
an edited, deleted, inserted, duplicated or reordered record; a truncated tail that a
checkpoint covers; a forged checkpoint; a checkpoint dropped from the middle (checkpoints
name their predecessor); a bundle signed by another key; a bundle that does not connect
to a checkpoint the auditor already holds (``since_checkpoint``) or does not reach one
(``through_checkpoint``). Nothing in the bundle's header is trusted but its public key,
which must be the trusted one. Records after the last checkpoint (the unsigned tail) are
reported but do not fail verification: nothing can prove them yet. Dropping the newest
records together with their checkpoints is detectable only with ``through_checkpoint``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kms.formats import audit_record, bundle
from kms.formats import checkpoint as cpfmt


class VerifyInputError(ValueError):
    """The inputs cannot be verified at all (bad public key, unreadable anchor)."""


@dataclass
class Report:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None  # of the last record whose chain verified
    checkpoints_verified: int = 0
    last_signed_seq: int | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def unsigned_tail(self) -> int:
        """Records after the last verified checkpoint."""
        if self.last_seq is None:
            return 0
        return self.last_seq - max(self.last_signed_seq or 0, (self.first_seq or 1) - 1)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        chain = (
            f"chain verified: seq {self.first_seq}..{self.last_seq}"
            if self.last_seq is not None and self.first_seq is not None
            else "chain verified: no record"
        )
        lines = [
            f"records: {self.records}",
            chain,
            f"checkpoints verified: {self.checkpoints_verified}"
            + (f", last at seq {self.last_signed_seq}" if self.last_signed_seq else ""),
        ]
        if self.ok:
            lines.append(f"unsigned tail: {self.unsigned_tail} record(s) after the last checkpoint")
        lines += [f"ERROR: {e}" for e in self.errors]
        lines.append("VERIFIED" if self.ok else "FAILED")
        return "\n".join(lines)


def verify_bundle(
    lines: Iterable[str | bytes],
    trusted_public_key_pem: bytes,
    since_checkpoint: Mapping[str, Any] | None = None,
    through_checkpoint: Mapping[str, Any] | None = None,
    max_unsigned: int | None = None,
) -> Report:
    """Verify a bundle (see kms/formats/bundle.py) against the trusted public key.

    Without ``since_checkpoint`` the bundle must start at the first record of the chain;
    with it, the bundle must continue exactly from that (verified) checkpoint. With
    ``through_checkpoint`` (a later checkpoint the auditor holds) the bundle must reach it
    and agree with it. With ``max_unsigned`` a longer unsigned tail fails: the server signs
    at least every KMS_AUDIT_CHECKPOINT_RECORDS records, so a longer one means checkpoints
    were dropped. Raises VerifyInputError only for unusable inputs; every finding about
    the bundle is in the returned Report."""
    try:
        key = cpfmt.load_public_key(trusted_public_key_pem)
        fingerprint = cpfmt.key_fingerprint(trusted_public_key_pem)
    except cpfmt.CheckpointError as e:
        raise VerifyInputError(str(e)) from None
    report = Report()
    expected_seq, prev_hash = 1, audit_record.GENESIS_HASH
    if since_checkpoint is not None:
        try:
            cpfmt.verify(since_checkpoint, key)
        except cpfmt.CheckpointError as e:
            raise VerifyInputError(f"the --since-checkpoint checkpoint: {e}") from None
        expected_seq = since_checkpoint["seq"] + 1
        prev_hash = since_checkpoint["record_hash"]
    if through_checkpoint is not None:
        try:
            cpfmt.verify(through_checkpoint, key)
        except cpfmt.CheckpointError as e:
            raise VerifyInputError(f"the --through-checkpoint checkpoint: {e}") from None

    header, records, checkpoints = _parse(lines, report)
    if header is None:
        report.errors.append("line 1: the bundle has no header")
    elif _fingerprint_of(header.get("public_key")) != fingerprint:
        report.errors.append("the bundle's public key is not the trusted public key")

    hashes = _check_chain(records, expected_seq, prev_hash, report)
    _check_checkpoints(checkpoints, hashes, key, fingerprint, report, expected_seq - 1)
    if through_checkpoint is not None:
        seq = through_checkpoint["seq"]
        if hashes.get(seq) != through_checkpoint["record_hash"]:
            report.errors.append(
                f"the bundle does not reach or agree with your checkpoint at seq {seq}: "
                "records were removed or rewritten (truncated or rolled back)"
            )
    if max_unsigned is not None and report.ok and report.unsigned_tail > max_unsigned:
        report.errors.append(
            f"{report.unsigned_tail} records after the last checkpoint, more than the "
            f"{max_unsigned} allowed: checkpoints were dropped or are overdue"
        )
    return report


def _parse(
    lines: Iterable[str | bytes], report: Report
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]:
    header: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = bundle.parse_line(raw)
        except bundle.BundleLineError as e:
            report.errors.append(f"line {number}: {e}")
            continue
        kind = obj.pop("type")
        if kind == "header":
            if number != 1:
                report.errors.append(f"line {number}: header not on the first line")
            header = obj
        elif kind == "record":
            records.append(obj)
        else:
            checkpoints.append(obj)
    return header, records, checkpoints


def _check_chain(
    records: list[dict[str, Any]], expected_seq: int, prev_hash: str, report: Report
) -> dict[int, str]:
    """Recompute the chain; returns seq -> hash for the records that verified."""
    hashes: dict[int, str] = {}
    report.records = len(records)
    if records:
        report.first_seq = expected_seq
    if records and records[0].get("seq") != expected_seq:
        where = "the first record of the chain" if expected_seq == 1 else "the held checkpoint"
        report.errors.append(
            f"seq {expected_seq}: the bundle starts at seq {records[0].get('seq')}, not at {where}"
        )
        return hashes
    try:
        audit_record.verify_chain(records, prev_hash=prev_hash, first_seq=expected_seq)
    except audit_record.ChainError as e:
        report.errors.append(f"seq {e.seq}: {_explain(e, records, expected_seq)}")
        good = e.seq - expected_seq
    else:
        good = len(records)
    for record in records[:good]:
        hashes[record["seq"]] = record["hash"]
    if good:
        report.last_seq = records[good - 1]["seq"]
    return hashes


def _explain(e: audit_record.ChainError, records: list[dict[str, Any]], first: int) -> str:
    index = e.seq - first
    found = records[index].get("seq") if index < len(records) else None
    if e.reason.startswith("found seq") and isinstance(found, int):
        if found > e.seq:
            return f"record(s) {e.seq}..{found - 1} deleted, or records reordered ({e.reason})"
        return f"record inserted, duplicated or reordered ({e.reason})"
    if "prev_hash" in e.reason:
        return "a record before this one was edited, deleted or replaced (" + e.reason + ")"
    return "record edited (" + e.reason + ")"


def _check_checkpoints(
    checkpoints: list[dict[str, Any]],
    hashes: dict[int, str],
    key: Any,
    fingerprint: str,
    report: Report,
    start: int,
) -> None:
    """Each checkpoint must be signed, name the trusted key, match the records it covers,
    and name its predecessor; ``start`` is the seq the segment continues from."""
    chain_ok = not report.errors
    last_in_bundle = report.last_seq or 0
    by_seq: dict[int, dict[str, Any]] = {}
    for cp in checkpoints:
        seq = cp.get("seq")
        try:
            cpfmt.verify(cp, key)
        except cpfmt.CheckpointError as e:
            report.errors.append(f"checkpoint at seq {seq}: {e} (forged or altered)")
            continue
        if cp["key_sha256"] != fingerprint:
            report.errors.append(f"checkpoint at seq {seq}: names another signing key")
            continue
        seq = int(cp["seq"])
        if seq in by_seq and by_seq[seq] != cp:
            report.errors.append(f"checkpoint at seq {seq}: two different checkpoints")
        by_seq[seq] = cp
    expected_prev = start
    for seq in sorted(by_seq):
        cp = by_seq[seq]
        if seq <= start:
            continue  # before the segment: nothing here to check it against
        if cp["prev_seq"] != expected_prev:
            report.errors.append(
                f"checkpoint at seq {seq}: follows the checkpoint at seq {cp['prev_seq']}, "
                f"but the bundle's previous one is at seq {expected_prev} (checkpoints dropped)"
            )
        expected_prev = seq
        if seq > last_in_bundle:
            if chain_ok:
                report.errors.append(
                    f"checkpoint at seq {seq}: the bundle ends at seq {last_in_bundle}; "
                    "records the checkpoint covers are missing (truncated)"
                )
        elif hashes.get(seq) != cp["record_hash"]:
            if seq in hashes:
                report.errors.append(
                    f"checkpoint at seq {seq}: does not match the records (history rewritten)"
                )
        else:
            report.checkpoints_verified += 1
            report.last_signed_seq = max(report.last_signed_seq or 0, seq)


def _fingerprint_of(pem: object) -> str | None:
    if not isinstance(pem, str) or len(pem) > 10_000:
        return None
    try:
        return cpfmt.key_fingerprint(pem.encode())
    except cpfmt.CheckpointError:
        return None
