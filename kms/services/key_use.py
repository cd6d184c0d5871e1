"""The one rule for using a key: may this principal use this key, at this version, for
this permission and justification, through this face, under this escrow case, now?

Everything here is pure: plain values in (the key row, the principal's grant, the key's
XKS policy, the standing of an escrow case), a refusal or None out. The audited unit of
work (kms/services/key_work.py) asks it twice per use, on the rows it first read (or the
worker cached) and again on the rows read inside the write transaction that appends the
audit record, so a change made meanwhile is honoured. No other module holds these rules.

A refusal is the ClientError the caller gets; its ``detail`` is the precise reason for
the audit record. The checks run in a fixed order, so a request that breaks several rules
always gets the same answer:

1. ``check_caller``, before any key is known: the role the face needs (service through a
   grant; requester only under an escrow case), the justification's name, and that
   ``legal_request`` and ``break_glass`` come only with a case;
2. ``decide``: under a case, the case's standing and scope; otherwise the grant's
   permission and justification; then the key's state; then, through the XKS face, the
   key's XKS policy (AWS principal, KMS operation, usage); then the version's retirement.

What a principal without a grant learns: nothing. A principal holding no grant at all on
a key gets ``NoGrant``, and so does a use of a key that does not exist (``decide_unknown``:
an unknown key id, an alias that does not exist, a blob naming no key), with the same
message; only the audit detail tells them apart. So the answer never says whether a key
or an alias exists, on any face, to a principal that may not use it. Admins and auditors
(who may read every key) and principals holding some grant on the key get precise
answers (NotFound, the key's state, the missing permission, an incorrect key).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from kms.errors import (
    ClientError,
    Forbidden,
    InvalidRequest,
    KeyStateError,
    KeyUsageRefused,
    KeyVersionRetired,
    NoGrant,
    NotFound,
)
from kms.formats.xks import XksKeyPolicy
from kms.services.model import (
    ESCROW_ONLY_JUSTIFICATIONS,
    JUSTIFICATIONS,
    CaseState,
    EscrowCase,
    Grant,
    Key,
    KeyState,
    Permission,
    Role,
)


class Face(enum.StrEnum):
    """Where a request came in. The native and AWS KMS faces share every rule; the XKS
    face (AWS KMS calling in for an external key store) has grants of its own
    (``xks_encrypt``, ``xks_decrypt``) and the key's XKS policy on top."""

    NATIVE = "native"
    AWS = "aws"
    XKS = "xks"


# The reason a case standing gives when its stored record no longer matches its digest.
CASE_ALTERED = "case altered in the database"

# The XKS usage (the policy's word) behind each XKS permission.
XKS_USAGE = {Permission.XKS_ENCRYPT: "encrypt", Permission.XKS_DECRYPT: "decrypt"}


@dataclass(frozen=True)
class XksCall:
    """What the XKS face's request metadata says about the caller on AWS's side."""

    aws_principal_arn: str | None
    kms_operation: str
    cdiv: bool = False  # encrypt asking for a ciphertext data integrity value


@dataclass(frozen=True)
class CaseUse:
    """One unwrap under an escrow case: what the case's scope is checked against."""

    case_id: str
    context: Mapping[str, str]
    blob: bytes = field(repr=False)  # the whole blob, for a scope that names blobs
    earlier: int = 0  # unwraps of this case earlier in the same request


@dataclass(frozen=True)
class CaseStanding:
    """An escrow case as read for one decision (None: no such case). ``approvals_hold``
    says whether its stored record matches its digest and its signed approvals still
    make a quorum without a veto; ``reason`` says why not. ``state`` is the case's state
    at the time of the decision (an expired case reads as expired)."""

    case: EscrowCase | None
    state: CaseState
    approvals_hold: bool
    reason: str = ""


@dataclass(frozen=True)
class Use:
    """One use of a key. ``version`` is the version a blob is opened under (a decrypt or
    rewrap source); None when sealing under the key's current version, which is never
    retired, or when the version could not be read. ``permission`` None asks only to
    describe the key (XKS metadata)."""

    permission: Permission | None
    version: int | None  # None: retirement is not checked (see above)
    justification: str | None = None  # None: the operation takes none (sealing)
    face: Face = Face.NATIVE
    case: CaseUse | None = None
    xks: XksCall | None = None


def check_caller(role: Role, justification: str | None, case_id: str | None) -> None:
    """Refuse, before any key is looked at, what no key could allow: an unknown
    justification, an escrow-only justification without a case, a case outside the
    requester role, a requester without a case."""
    if justification is not None:
        if justification not in JUSTIFICATIONS:
            raise InvalidRequest(
                "justification must be one of: " + ", ".join(sorted(JUSTIFICATIONS))
            )
        if case_id is None and justification in ESCROW_ONLY_JUSTIFICATIONS:
            raise Forbidden(
                f"justification {justification!r} needs an escrow case",
                detail=f"justification {justification} needs an escrow case",
            )
    if case_id is not None and role is not Role.REQUESTER:
        raise Forbidden("escrow cases are for requesters")
    if case_id is None and role is Role.REQUESTER:
        raise Forbidden("a requester unwraps only within an escrow case")


def decide(
    key: Key,
    grant: Grant,
    use: Use,
    *,
    xks_policy: XksKeyPolicy | None = None,
    case: CaseStanding | None = None,
    requester: str | None = None,
) -> ClientError | None:
    """The refusal of ``use`` on ``key`` (None: allowed). ``grant`` is the principal's
    grant on the key (empty if none); ``xks_policy`` the key's XKS policy (needed for the
    XKS face); ``case`` and ``requester`` (the caller's name) for a use under a case."""
    if use.case is not None:
        refusal = _case_refusal(key.key_id, use, use.case, case, requester)
    else:
        refusal = _grant_refusal(grant, use)
    if refusal is None and use.permission is not None and key.state is not KeyState.ENABLED:
        refusal = KeyStateError.of(key.state.value)
    if refusal is None and use.face is Face.XKS:
        refusal = _xks_refusal(use, xks_policy or XksKeyPolicy())
    if refusal is None and use.version is not None and not key.usable_for(use.version):
        refusal = KeyVersionRetired(
            f"version {use.version} of this key is retired "
            f"(min_decryption_version {key.min_decryption_version})",
            detail=f"version {use.version} < min {key.min_decryption_version}",
        )
    return refusal


def decide_unknown(
    key_id: str | None,
    use: Use,
    reason: str,
    *,
    case: CaseStanding | None = None,
    requester: str | None = None,
) -> ClientError | None:
    """The refusal of ``use`` of a key that does not exist (``key_id`` None: an alias that
    names no key), with ``reason`` in its detail. Outside a case it is exactly the refusal
    an existing key gives a principal holding no grant on it (NoGrant, same message), so
    that the answer does not say whether the key exists. Under an escrow case the case's
    refusals come first, as for an existing key (an unknown key is outside its scope);
    None only if the case's scope names the missing key: the caller then answers its own
    "no such key" (the requester knows the scope)."""
    if use.case is not None:
        refusal = _case_refusal(key_id, use, use.case, case, requester)
        if refusal is not None:
            refusal.detail = f"{refusal.detail}; {reason}"
        return refusal
    refusal = _grant_refusal(Grant(), use)
    assert refusal is not None, "an empty grant allows nothing"
    refusal.detail = reason
    return refusal


def visible(role: Role, key: Key | None, grant: Grant) -> ClientError | None:
    """Whether a principal may read a key's metadata (DescribeKey): admins and auditors
    every key (NotFound for none), services a key they hold a grant on; a service
    without one gets the same NoGrant whether or not the key exists."""
    if role in (Role.ADMIN, Role.AUDITOR):
        return NotFound("no such key", detail="no such key") if key is None else None
    if key is None:
        return NoGrant("no grant on this key", detail="no such key")
    if not grant.operations:
        return NoGrant("no grant on this key", detail="no grant")
    return None


def _no_grant(grant: Grant, message: str) -> Forbidden:
    """No grant for the use: NoGrant if the principal holds none on the key at all (the
    answer a key that does not exist gives too), a plain Forbidden otherwise."""
    refused = NoGrant if not grant.operations else Forbidden
    return refused(message, detail="no grant")


def _grant_refusal(grant: Grant, use: Use) -> ClientError | None:
    if use.permission is None:  # describing a key through XKS needs one of its grants
        if not any(grant.allows(p) for p in XKS_USAGE):
            return _no_grant(grant, "no xks grant on this key")
        return None
    if not grant.allows(use.permission):
        return _no_grant(grant, f"no {use.permission.value} grant on this key")
    code = use.justification
    if code is not None and not grant.allows(use.permission, code):
        where = "your grant" if use.face is Face.XKS else "your grant on this key"
        return Forbidden(
            f"justification {code!r} is not allowed by {where}",
            detail=f"justification {code} not granted",
        )
    return None


def _case_refusal(
    key_id: str | None,
    use: Use,
    unwrap: CaseUse,
    standing: CaseStanding | None,
    requester: str | None,
) -> ClientError | None:
    case = standing.case if standing is not None else None
    if standing is None or case is None or case.requester != requester:
        return Forbidden("no such case of yours", detail="unknown case or not the requester")
    if standing.state is not CaseState.ACTIVE:
        state = standing.state.value
        return Forbidden(f"the case is {state}", detail=f"case {state}")
    if use.justification != case.justification:
        return Forbidden(
            "the justification differs from the case's",
            detail=f"justification {use.justification} vs case {case.justification}",
        )
    if key_id not in case.scope["keys"]:
        return Forbidden("the blob's key is outside the case scope", detail="key out of scope")
    wanted = case.scope.get("context") or {}
    if any(unwrap.context.get(k) != v for k, v in wanted.items()):
        return Forbidden("the context is outside the case scope", detail="context out of scope")
    blobs = case.scope.get("blobs")
    if blobs is not None and hashlib.sha256(unwrap.blob).hexdigest() not in blobs:
        return Forbidden("the blob is not one the case names", detail="blob out of scope")
    if case.unwraps_used + unwrap.earlier >= case.max_unwraps:
        return Forbidden("the case has no unwraps left", detail="unwrap budget used up")
    if not standing.approvals_hold:
        if standing.reason == CASE_ALTERED:
            return Forbidden("the case record does not match its digest", detail=standing.reason)
        return Forbidden("the case no longer has its approvals", detail=standing.reason)
    return None


def _xks_refusal(use: Use, policy: XksKeyPolicy) -> ClientError | None:
    call = use.xks
    assert call is not None, "an XKS use carries its request metadata"
    if not policy.principal_allowed(call.aws_principal_arn):
        return Forbidden(
            "the key's XKS policy does not allow this AWS principal",
            detail="xks policy refuses awsPrincipalArn",
        )
    if not policy.operation_allowed(call.kms_operation):
        return Forbidden(
            "the key's XKS policy does not allow this KMS operation",
            detail="xks policy refuses kmsOperation",
        )
    if use.permission is None:
        return None
    usage = XKS_USAGE[use.permission]
    if usage not in policy.usage:
        return KeyUsageRefused(
            f"the key may not {usage} through XKS", detail=f"xks usage lacks {usage}"
        )
    if call.cdiv and "decrypt" not in policy.usage:
        return KeyUsageRefused(
            "a ciphertext data integrity value needs a key that may also decrypt",
            detail="xks usage lacks decrypt (CDIV test decrypt)",
        )
    return None
