"""Offline verification of an audit bundle: no server, database or HSM needed.

Given the bundle and the audit public key the auditor trusts, it recomputes the hash
chain and checks every checkpoint signature, and says precisely what is wrong and where:
an edited, deleted, inserted, duplicated or reordered record; a truncated tail that a
checkpoint covers; a forged checkpoint; a checkpoint dropped from the middle (checkpoints
name their predecessor); a bundle signed by another key; a bundle that does not connect
to a checkpoint the auditor already holds (``since_checkpoint``) or does not reach one
(``through_checkpoint``); a trail rewritten after one of the data owner's witnessed
checkpoints (``witnessed``); sealed rows that differ from those a format 2 checkpoint
signed (``state``, a state export: a row rolled back, inserted or deleted). Nothing in the
bundle's header is trusted but its public key, which must be the trusted one.

Strict by default: a chain alone proves nothing (anyone who can write the database can
recompute one), so a bundle that no valid signature covers fails, and so does an unsigned
tail (records after the last signature) longer than ``DEFAULT_MAX_UNSIGNED``. A signature
covers a record if a verified checkpoint of the bundle, the held ``since_checkpoint`` or a
matched ``through_checkpoint`` is at or after it. Looser checks are explicit
(``allow_unsigned``, a larger or no ``max_unsigned``), and the report then lists what was
not verified by a signature. Dropping the newest records together with their checkpoints
is detectable only against a later checkpoint held outside the keyholder
(``through_checkpoint``, ``witnessed``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kms.formats import audit_record, bundle
from kms.formats import checkpoint as cpfmt
from kms.formats.state_export import StateExport
from kms.services.state_verify import check_state, state_history_errors

# The longest unsigned tail accepted by default: the server signs a checkpoint at least
# every KMS_AUDIT_CHECKPOINT_RECORDS records (default 1000) and every
# KMS_AUDIT_CHECKPOINT_SECONDS seconds, so an honest export has at most about this many.
DEFAULT_MAX_UNSIGNED = 1000


class VerifyInputError(ValueError):
    """The inputs cannot be verified at all (bad public key, unreadable anchor)."""


@dataclass
class Report:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None  # of the last record whose chain verified
    checkpoints_verified: int = 0
    last_signed_seq: int | None = None  # of the newest verified checkpoint in the bundle
    held_seq: int | None = None  # newest auditor-held checkpoint the records agree with
    max_unsigned: int | None = DEFAULT_MAX_UNSIGNED
    witnessed: int = 0  # distinct witnessed checkpoints given
    witnessed_matched: int = 0
    witnessed_before: int = 0  # before the bundle's start: nothing to compare them with
    state_checked: str | None = None  # what a state export was found to match
    errors: list[str] = field(default_factory=list)
    not_verified: list[str] = field(default_factory=list)  # accepted by a looser option

    @property
    def signed_through(self) -> int | None:
        """The newest seq a verified signature covers (None: no signature at all)."""
        found = [s for s in (self.last_signed_seq, self.held_seq) if s is not None]
        return max(found) if found else None

    @property
    def unsigned_tail(self) -> int:
        """Records after the last verified signature."""
        if self.last_seq is None:
            return 0
        return self.last_seq - max(self.signed_through or 0, (self.first_seq or 1) - 1)

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
            bound = "no limit" if self.max_unsigned is None else f"at most {self.max_unsigned}"
            lines.append(
                f"unsigned tail: {self.unsigned_tail} record(s) after the last checkpoint, "
                f"not covered by a signature ({bound} allowed)"
            )
        if self.witnessed:
            lines.append(
                f"witnessed checkpoints: {self.witnessed_matched} of {self.witnessed} found "
                "identical in the bundle"
                + (
                    f", {self.witnessed_before} before its start (not compared)"
                    if self.witnessed_before
                    else ""
                )
            )
        if self.state_checked:
            lines.append(f"state export: {self.state_checked}")
        lines += [f"ERROR: {e}" for e in self.errors]
        lines += [f"NOT VERIFIED BY SIGNATURE: {n}" for n in self.not_verified]
        if not self.ok:
            lines.append("FAILED")
        elif self.not_verified:
            lines.append("VERIFIED ONLY IN PART: see NOT VERIFIED BY SIGNATURE above")
        else:
            lines.append("VERIFIED")
        return "\n".join(lines)


def verify_bundle(
    lines: Iterable[str | bytes],
    trusted_public_key_pem: bytes,
    since_checkpoint: Mapping[str, Any] | None = None,
    through_checkpoint: Mapping[str, Any] | None = None,
    max_unsigned: int | None = DEFAULT_MAX_UNSIGNED,
    *,
    allow_unsigned: bool = False,
    witnessed: Iterable[Mapping[str, Any]] = (),
    state: StateExport | None = None,
) -> Report:
    """Verify a bundle (see kms/formats/bundle.py) against the trusted public key.

    Without ``since_checkpoint`` the bundle must start at the first record of the chain;
    with it, the bundle must continue exactly from that (verified) checkpoint. With
    ``through_checkpoint`` (a later checkpoint the auditor holds) the bundle must reach it
    and agree with it. A bundle that no verified signature covers fails unless
    ``allow_unsigned`` (its records are then listed in ``Report.not_verified``); an
    unsigned tail longer than ``max_unsigned`` (default DEFAULT_MAX_UNSIGNED; None: no
    limit) fails: the server signs at least every KMS_AUDIT_CHECKPOINT_RECORDS records, so
    a longer one means checkpoints were dropped or are overdue. ``witnessed`` are
    checkpoints the data owner received (webhook or feed): each one at or after the
    bundle's start must be in the bundle, identical, and agree with its records; one
    beyond the bundle's end, or whose record has another hash, means the trail was
    truncated or rewritten after it was witnessed. With ``state`` (a state export, read
    with kms/formats/state_export.py) the public digest of its rows must be the one every
    verified checkpoint at its ``state_seq`` signed, and there must be one. Raises
    VerifyInputError only for unusable inputs (a held or witnessed checkpoint that is
    malformed or not signed by the trusted key); every finding about the bundle is in the
    returned Report."""
    try:
        key = cpfmt.load_public_key(trusted_public_key_pem)
        fingerprint = cpfmt.key_fingerprint(trusted_public_key_pem)
    except cpfmt.CheckpointError as e:
        raise VerifyInputError(str(e)) from None
    report = Report(max_unsigned=max_unsigned)
    expected_seq, prev_hash = 1, audit_record.GENESIS_HASH
    if since_checkpoint is not None:
        _check_held(since_checkpoint, key, fingerprint, "the --since-checkpoint checkpoint")
        expected_seq = since_checkpoint["seq"] + 1
        prev_hash = since_checkpoint["record_hash"]
        report.held_seq = since_checkpoint["seq"]
    if through_checkpoint is not None:
        _check_held(through_checkpoint, key, fingerprint, "the --through-checkpoint checkpoint")
    witnesses = _witnesses(witnessed, key, fingerprint, report)

    header, records, checkpoints = _parse(lines, report)
    if header is None:
        report.errors.append("line 1: the bundle has no header")
    elif _fingerprint_of(header.get("public_key")) != fingerprint:
        report.errors.append("the bundle's public key is not the trusted public key")

    hashes = _check_chain(records, expected_seq, prev_hash, report)
    in_bundle = _check_checkpoints(checkpoints, hashes, key, fingerprint, report, expected_seq - 1)
    if through_checkpoint is not None:
        seq = through_checkpoint["seq"]
        if hashes.get(seq) != through_checkpoint["record_hash"]:
            report.errors.append(
                f"the bundle does not reach or agree with your checkpoint at seq {seq}: "
                "records were removed or rewritten (truncated or rolled back)"
            )
        else:
            report.held_seq = max(report.held_seq or 0, seq)
    _check_witnessed(witnesses, hashes, in_bundle, since_checkpoint, expected_seq - 1, report)
    report.errors.extend(state_history_errors(in_bundle.values()))
    if state is not None:
        held = [cp for cp in (since_checkpoint, through_checkpoint) if cp is not None]
        matched, message = check_state(state, [*in_bundle.values(), *held])
        if matched:
            report.state_checked = message
        else:
            report.errors.append(message)
    if report.ok:
        _check_signed(report, allow_unsigned)
    return report


def _check_held(cp: Mapping[str, Any], key: Any, fingerprint: str, name: str) -> None:
    try:
        cpfmt.verify(cp, key)
    except cpfmt.CheckpointError as e:
        raise VerifyInputError(f"{name}: {e}") from None
    if cp["key_sha256"] != fingerprint:
        raise VerifyInputError(f"{name}: names another signing key")


def _check_signed(report: Report, allow_unsigned: bool) -> None:
    """Strictness: some signature must cover the records, and the tail must be short."""
    signed, tail, last = report.signed_through, report.unsigned_tail, report.last_seq
    if signed is None:
        span = f"seq {report.first_seq}..{last} ({report.records} records)" if last else "none"
        what = (
            f"no valid checkpoint signature covers the bundle (records: {span}); a chain "
            "alone is what anyone who can write the database can compute"
        )
        if allow_unsigned:
            report.not_verified.append(what + " (accepted by --allow-unsigned)")
        else:
            report.errors.append(
                what + ": have an admin sign a checkpoint (kms audit checkpoint) and export "
                "again, or verify a bundle that starts at a checkpoint you hold"
            )
        return
    if not tail:
        return
    assert last is not None
    span = f"seq {last - tail + 1}..{last} ({tail} records) after the last signature"
    if report.max_unsigned is not None and tail > report.max_unsigned:
        report.errors.append(
            f"{tail} records after the last checkpoint, more than the {report.max_unsigned} "
            "allowed: checkpoints were dropped or are overdue"
        )
    elif tail > DEFAULT_MAX_UNSIGNED:
        report.not_verified.append(
            f"{span}, more than the default {DEFAULT_MAX_UNSIGNED} (accepted by --max-unsigned "
            "or --allow-unsigned)"
        )


def _witnesses(
    witnessed: Iterable[Mapping[str, Any]], key: Any, fingerprint: str, report: Report
) -> dict[int, Mapping[str, Any]]:
    """The distinct witnessed checkpoints by seq; two different ones at one seq, both
    signed by the trusted key, mean the keyholder signed two histories."""
    by_seq: dict[int, Mapping[str, Any]] = {}
    seen: set[tuple[int, str, str]] = set()
    for number, cp in enumerate(witnessed, 1):
        _check_held(cp, key, fingerprint, f"witnessed checkpoint {number}")
        seq = cp["seq"]
        ident = (seq, cp["record_hash"], cp["signature"])
        if ident in seen:
            continue  # delivered twice (a retried webhook, the feed and the webhook)
        seen.add(ident)
        report.witnessed += 1
        if seq in by_seq:
            if by_seq[seq]["record_hash"] != cp["record_hash"]:
                report.errors.append(
                    f"witnessed checkpoint at seq {seq}: two signed checkpoints with different "
                    "record hashes were witnessed: the trail was rewritten and signed again"
                )
            continue
        by_seq[seq] = cp
    return by_seq


def _check_witnessed(
    witnesses: dict[int, Mapping[str, Any]],
    hashes: dict[int, str],
    in_bundle: dict[int, dict[str, Any]],
    since: Mapping[str, Any] | None,
    start: int,
    report: Report,
) -> None:
    """Every witnessed checkpoint from the bundle's start on must be in it, identical."""
    rewritten = "the trail was rewritten after that checkpoint was witnessed"
    end = report.last_seq if report.last_seq is not None else start
    for seq in sorted(witnesses):
        cp = witnesses[seq]
        where = f"witnessed checkpoint at seq {seq}"
        if seq < start or (seq == start and since is None):
            report.witnessed_before += 1
        elif seq == start:
            assert since is not None
            if since["record_hash"] != cp["record_hash"]:
                report.errors.append(
                    f"{where}: does not match your --since-checkpoint: {rewritten}"
                )
            else:
                report.witnessed_matched += 1
        elif seq > end:
            report.errors.append(
                f"{where}: beyond the end of the bundle's verified chain at seq {end}: "
                f"records were removed (truncated or rolled back), or {rewritten}"
            )
        elif hashes.get(seq) != cp["record_hash"]:
            report.errors.append(
                f"{where}: the bundle's record {seq} has another hash: {rewritten}"
            )
        elif seq not in in_bundle:
            report.errors.append(f"{where}: missing from the bundle (checkpoints were deleted)")
        elif not _same(in_bundle[seq], cp):
            report.errors.append(
                f"{where}: the bundle's checkpoint at seq {seq} is another one "
                "(checkpoints were replaced)"
            )
        else:
            report.witnessed_matched += 1


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(name) == b.get(name) for name in cpfmt.FIELDS)


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
) -> dict[int, dict[str, Any]]:
    """Each checkpoint must be signed, name the trusted key, match the records it covers,
    and name its predecessor; ``start`` is the seq the segment continues from. Returns
    the checkpoints whose signature verified, by seq."""
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
    return by_seq


def _fingerprint_of(pem: object) -> str | None:
    if not isinstance(pem, str) or len(pem) > 10_000:
        return None
    try:
        return cpfmt.key_fingerprint(pem.encode())
    except cpfmt.CheckpointError:
        return None
