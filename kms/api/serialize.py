"""JSON shapes of the v1 API's responses (documented in docs/api.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kms.api.errors import error_body
from kms.api.parsing import encode
from kms.errors import ClientError
from kms.services.crypto import Opened, Sealed
from kms.services.model import EscrowPolicy, Key, KeyUsage, Principal, Token
from kms.services.rotation import next_rotation


def iso(when: datetime | None) -> str | None:
    return when.isoformat().replace("+00:00", "Z") if when else None


def key(k: Key) -> dict[str, Any]:
    return {
        "key_id": k.key_id,
        "alias": k.alias,
        "description": k.description,
        "state": k.state.value,
        "current_version": k.current_version,
        "created_at": iso(k.created_at),
        "deletion_date": iso(k.deletion_date),
        "escrow_policy": policy(k.escrow_policy) if k.escrow_policy else None,
        "rotation_period_days": k.rotation_period_days,
        "rotated_at": iso(k.rotated_at),
        "next_rotation": iso(next_rotation(k)),
        "min_decryption_version": k.min_decryption_version,
    }


def usage(u: KeyUsage) -> dict[str, Any]:
    return {
        "key_id": u.key.key_id,
        "current_version": u.key.current_version,
        "min_decryption_version": u.key.min_decryption_version,
        "versions": [
            {
                "version": v.version,
                "created_at": iso(v.created_at),
                "decrypts": v.decrypts,
                "last_used": v.last_used,
                "retired": v.retired,
            }
            for v in u.versions
        ],
        "days": [{"day": d.day, "version": d.version, "decrypts": d.decrypts} for d in u.days],
    }


def policy(x: EscrowPolicy) -> dict[str, Any]:
    return {
        "quorum": x.quorum,
        "required_groups": sorted(x.required_groups),
        "veto_groups": sorted(x.veto_groups),
    }


def principal(p: Principal) -> dict[str, Any]:
    return {
        "id": p.id,
        "name": p.name,
        "role": p.role.value,
        "created_at": iso(p.created_at),
        "state": "disabled" if p.disabled else "enabled",
        "disabled_at": None if p.disabled_at is None else iso(p.disabled_at),
        "sessions_since": None if p.sessions_since is None else iso(p.sessions_since),
    }


def token(t: Token) -> dict[str, Any]:
    """A token as listed: never the token, only its id (16 hex digits of its SHA-256)."""
    return {
        "token_id": t.token_id,
        "created_at": iso(t.created_at),
        "expires_at": None if t.expires_at is None else iso(t.expires_at),
        "last_used_at": None if t.last_used_at is None else iso(t.last_used_at),
    }


def sealed(s: Sealed) -> dict[str, Any]:
    out: dict[str, Any] = {
        "key_id": s.key_id,
        "key_version": s.key_version,
        "ciphertext": encode(s.ciphertext),
    }
    if s.plaintext is not None:
        out["plaintext"] = encode(s.plaintext)
    return out


def opened(o: Opened) -> dict[str, Any]:
    return {"key_id": o.key_id, "key_version": o.key_version, "plaintext": encode(o.plaintext)}


def item(result: Sealed | Opened | ClientError) -> dict[str, Any]:
    if isinstance(result, ClientError):
        return {"error": error_body(result)}
    return sealed(result) if isinstance(result, Sealed) else opened(result)
