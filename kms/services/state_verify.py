"""The offline verifier's check of a state export (kms/formats/state_export.py) against
the format 2 checkpoints of a bundle (kms/services/audit_verify.py): the sealed rows the
export shows must be those the HSM-signed checkpoint at their change ``n`` committed to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kms.formats.state_export import StateExport


def state_history_errors(signed: Iterable[Mapping[str, Any]]) -> list[str]:
    """What is wrong with the sealed state the format 2 checkpoints of a bundle carry, in
    chain order: it never goes back (a later checkpoint at an older state change), and
    one state change has one digest (two digests at the same change: a state was
    laundered and re-anchored)."""
    errors: list[str] = []
    seen: dict[int, str] = {}
    newest = -1
    for cp in sorted(signed, key=lambda cp: cp["seq"]):
        if "state_seq" not in cp:
            continue
        n, digest = cp["state_seq"], cp["state_sha256"]
        if n < newest:
            errors.append(
                f"checkpoint at seq {cp['seq']} carries state change {n}, older than the "
                f"{newest} an earlier checkpoint carries: the sealed state went back"
            )
        if seen.setdefault(n, digest) != digest:
            errors.append(
                f"checkpoint at seq {cp['seq']} carries a different digest for state change "
                f"{n} than an earlier checkpoint: the sealed state was replaced"
            )
        newest = max(newest, n)
    return errors


def check_state(export: StateExport, signed: Sequence[Mapping[str, Any]]) -> tuple[bool, str]:
    """``(True, what matched)`` if the public digest of the export's rows is the one that
    every checkpoint of ``signed`` (checkpoints whose signature verified) at the export's
    ``state_seq`` carries, and there is one; ``(False, the finding)`` otherwise."""
    n, digest = export.state_seq, export.digest()
    at = sorted((cp for cp in signed if cp.get("state_seq") == n), key=lambda cp: cp["seq"])
    if not at:
        carried = sorted({cp["state_seq"] for cp in signed if "state_seq" in cp})
        found = (
            "its checkpoints are at state change " + ", ".join(map(str, carried[-5:]))
            if carried
            else "none of its checkpoints carries the sealed state"
        )
        return False, (
            f"the state export is at state change {n}, but no signed checkpoint of the bundle "
            f"is at that change ({found}): export the state first, then the bundle"
        )
    edited = export.state_sha256 != digest
    also = "; the export's own state_sha256 does not match its rows either" if edited else ""
    for cp in at:
        if cp["state_sha256"] != digest:
            return False, (
                f"the state export does not match the signed checkpoint at state change {n}: "
                "a sealed row differs (rolled back, inserted or deleted); checkpoint at seq "
                f"{cp['seq']}{also}"
            )
    if edited:
        return False, "the state export's state_sha256 does not match its own rows (edited)"
    plural = "s" if len(at) > 1 else ""
    seqs = ", ".join(str(cp["seq"]) for cp in at)
    return True, (
        f"{len(export.rows)} sealed rows at state change {n} match the signed "
        f"checkpoint{plural} at seq {seqs}"
    )
