"""The key-use rule (kms/services/key_use.py) as a table, with plain values: no HTTP, no
HSM, no database. Every combination of key state, retired version, grant permissions,
grant justifications, face and escrow case standing is decided, and the answer is
checked against the documented order of the checks; the native and XKS faces are
checked to refuse the same situations identically."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from kms.errors import (
    ClientError,
    Forbidden,
    InvalidRequest,
    KeyStateError,
    KeyUsageRefused,
    KeyVersionRetired,
)
from kms.formats.xks import XksKeyPolicy
from kms.services.key_use import (
    CaseStanding,
    CaseUse,
    Face,
    Use,
    XksCall,
    check_caller,
    decide,
)
from kms.services.model import CaseState, EscrowCase, Grant, Key, KeyState, Permission, Role

WHEN = datetime(2026, 1, 1, tzinfo=UTC)
KEY = Key("k-1", None, "", KeyState.ENABLED, 3, WHEN, min_decryption_version=2)
CALL = XksCall("arn:aws:iam::111122223333:role/app", "Decrypt")
NATIVE_FOR_XKS = {Permission.XKS_DECRYPT: Permission.DECRYPT, Permission.XKS_ENCRYPT: None}


def _case(**changes: object) -> EscrowCase:
    case = EscrowCase(
        case_id="c-1",
        version=1,
        requester="police",
        legal_basis="court order",
        reference="ref",
        justification="legal_request",
        scope={"keys": ["k-1"], "context": {"patient": "p1"}, "blobs": None},
        max_unwraps=2,
        unwraps_used=0,
        expires_at="2027-01-01T00:00:00.000Z",
        state=CaseState.ACTIVE,
        digest="",
        created_at="2026-01-01T00:00:00.000Z",
    )
    return replace(case, **changes)  # type: ignore[arg-type]


def _code(refusal: ClientError | None) -> str | None:
    return None if refusal is None else f"{refusal.code}:{refusal.detail}"


# -- the table: one row per rule, named situations and their exact answers ------------------

GRANT = Grant(frozenset({"decrypt", "xks_decrypt"}), frozenset({"service_processing"}))
TABLE: list[tuple[str, Key, Grant, Use, str | None]] = [
    ("allowed", KEY, GRANT, Use(Permission.DECRYPT, 3, "service_processing"), None),
    (
        "no grant",
        KEY,
        Grant(),
        Use(Permission.DECRYPT, 3, "service_processing"),
        "forbidden:no grant",
    ),
    (
        "other permission only",
        KEY,
        Grant(frozenset({"encrypt"})),
        Use(Permission.DECRYPT, 3, "service_processing"),
        "forbidden:no grant",
    ),
    (
        "justification not granted",
        KEY,
        GRANT,
        Use(Permission.DECRYPT, 3, "customer_initiated"),
        "forbidden:justification customer_initiated not granted",
    ),
    (
        "disabled",
        replace(KEY, state=KeyState.DISABLED),
        GRANT,
        Use(Permission.DECRYPT, 3, "service_processing"),
        "key_state:state=disabled",
    ),
    (
        "pending deletion",
        replace(KEY, state=KeyState.PENDING_DELETION),
        GRANT,
        Use(Permission.DECRYPT, 3, "service_processing"),
        "key_state:state=pending_deletion",
    ),
    (
        "retired version",
        KEY,
        GRANT,
        Use(Permission.DECRYPT, 1, "service_processing"),
        "key_version_retired:version 1 < min 2",
    ),
    (
        "sealing ignores retirement",
        KEY,
        Grant(frozenset({"encrypt"})),
        Use(Permission.ENCRYPT, None),
        None,
    ),
    (
        "grant before state",
        replace(KEY, state=KeyState.DISABLED),
        Grant(),
        Use(Permission.DECRYPT, 1, "service_processing"),
        "forbidden:no grant",
    ),
    (
        "state before retirement",
        replace(KEY, state=KeyState.DESTROYED),
        GRANT,
        Use(Permission.DECRYPT, 1, "service_processing"),
        "key_state:state=destroyed",
    ),
    (
        "xks needs its own grant",
        KEY,
        Grant(frozenset({"decrypt"})),
        Use(Permission.XKS_DECRYPT, 3, "service_processing", Face.XKS, xks=CALL),
        "forbidden:no grant",
    ),
    (
        "native needs its own grant",
        KEY,
        Grant(frozenset({"xks_decrypt"})),
        Use(Permission.DECRYPT, 3, "service_processing"),
        "forbidden:no grant",
    ),
    (
        "xks metadata reports a disabled key",
        replace(KEY, state=KeyState.DISABLED),
        GRANT,
        Use(None, None, face=Face.XKS, xks=CALL),
        None,
    ),
    (
        "xks metadata needs an xks grant",
        KEY,
        Grant(frozenset({"decrypt"})),
        Use(None, None, face=Face.XKS, xks=CALL),
        "forbidden:no grant",
    ),
]


@pytest.mark.parametrize(
    ("name", "key", "grant", "use", "expected"), TABLE, ids=[r[0] for r in TABLE]
)
def test_table(name: str, key: Key, grant: Grant, use: Use, expected: str | None) -> None:
    assert _code(decide(key, grant, use)) == expected


XKS_POLICIES = [
    ("default", XksKeyPolicy(), CALL, None),
    (
        "principal not listed",
        XksKeyPolicy(aws_principals=("arn:aws:iam::999999999999:*",)),
        CALL,
        "forbidden:xks policy refuses awsPrincipalArn",
    ),
    (
        "principal pattern",
        XksKeyPolicy(aws_principals=("arn:aws:iam::111122223333:*",)),
        CALL,
        None,
    ),
    (
        "operation not listed",
        XksKeyPolicy(kms_operations=("Encrypt",)),
        CALL,
        "forbidden:xks policy refuses kmsOperation",
    ),
    (
        "usage lacks decrypt",
        XksKeyPolicy(usage=frozenset({"encrypt"})),
        CALL,
        "invalid_key_usage:xks usage lacks decrypt",
    ),
]


@pytest.mark.parametrize(
    ("name", "policy", "call", "expected"), XKS_POLICIES, ids=[r[0] for r in XKS_POLICIES]
)
def test_xks_policy(name: str, policy: XksKeyPolicy, call: XksCall, expected: str | None) -> None:
    use = Use(Permission.XKS_DECRYPT, 3, "service_processing", Face.XKS, xks=call)
    assert _code(decide(KEY, GRANT, use, xks_policy=policy)) == expected


def test_a_cdiv_needs_a_key_that_may_also_decrypt() -> None:
    use = Use(Permission.XKS_ENCRYPT, None, face=Face.XKS, xks=replace(CALL, cdiv=True))
    grant = Grant(frozenset({"xks_encrypt"}))
    encrypt_only = XksKeyPolicy(usage=frozenset({"encrypt"}))
    refusal = decide(KEY, grant, use, xks_policy=encrypt_only)
    assert isinstance(refusal, KeyUsageRefused)
    assert refusal.detail == "xks usage lacks decrypt (CDIV test decrypt)"
    assert decide(KEY, grant, use, xks_policy=XksKeyPolicy()) is None


# -- every combination, against the documented order of the checks ---------------------------

STATES = list(KeyState)
VERSIONS = [1, 2, 3]  # 1 is retired (min_decryption_version 2)
PERMISSION_SETS = [frozenset(), frozenset({"decrypt"}), frozenset({"xks_decrypt"})]
JUSTIFICATION_SETS = [frozenset({"service_processing"}), frozenset({"customer_initiated"})]
FACES = [Face.NATIVE, Face.AWS, Face.XKS]


def _expected(
    state: KeyState, version: int, ops: frozenset[str], codes: frozenset[str], face: Face
) -> str:
    needed = "xks_decrypt" if face is Face.XKS else "decrypt"
    if needed not in ops:
        return "forbidden"
    if "service_processing" not in codes:
        return "forbidden"
    if state is not KeyState.ENABLED:
        return "key_state"
    if version < KEY.min_decryption_version:
        return "key_version_retired"
    return "ok"


@pytest.mark.parametrize(
    ("state", "version", "ops", "codes", "face"),
    list(itertools.product(STATES, VERSIONS, PERMISSION_SETS, JUSTIFICATION_SETS, FACES)),
)
def test_every_combination(
    state: KeyState, version: int, ops: frozenset[str], codes: frozenset[str], face: Face
) -> None:
    key = replace(KEY, state=state)
    permission = Permission.XKS_DECRYPT if face is Face.XKS else Permission.DECRYPT
    use = Use(
        permission, version, "service_processing", face, xks=CALL if face is Face.XKS else None
    )
    refusal = decide(key, Grant(ops, codes), use)
    assert (refusal.code if refusal else "ok") == _expected(state, version, ops, codes, face)


@pytest.mark.parametrize(
    ("state", "version", "codes"),
    list(itertools.product(STATES, VERSIONS, JUSTIFICATION_SETS)),
)
def test_the_native_and_xks_faces_refuse_identically(
    state: KeyState, version: int, codes: frozenset[str]
) -> None:
    """The same situation (key state, version, a decrypt grant with these justifications)
    through either face: the same refusal, message aside (the XKS face names its grant)."""
    key = replace(KEY, state=state)
    native = decide(
        key,
        Grant(frozenset({"decrypt"}), codes),
        Use(Permission.DECRYPT, version, "service_processing"),
    )
    xks = decide(
        key,
        Grant(frozenset({"xks_decrypt"}), codes),
        Use(Permission.XKS_DECRYPT, version, "service_processing", Face.XKS, xks=CALL),
    )
    assert type(native) is type(xks)
    assert (native and (native.code, native.detail)) == (xks and (xks.code, xks.detail))


# -- escrow cases ------------------------------------------------------------------------------

CONTEXT = {"patient": "p1"}


def _under_case(
    standing: CaseStanding | None,
    *,
    key: Key = KEY,
    justification: str = "legal_request",
    context: dict[str, str] = CONTEXT,
    earlier: int = 0,
    requester: str = "police",
) -> str | None:
    use = Use(
        Permission.DECRYPT,
        3,
        justification,
        case=CaseUse("c-1", context, b"blob", earlier),
    )
    return _code(decide(key, Grant(), use, case=standing, requester=requester))


ACTIVE = CaseStanding(_case(), CaseState.ACTIVE, True)
CASES = [
    ("no grant is needed under a case", ACTIVE, {}, None),
    ("unknown case", None, {}, "forbidden:unknown case or not the requester"),
    (
        "someone else's case",
        ACTIVE,
        {"requester": "other"},
        "forbidden:unknown case or not the requester",
    ),
    *[
        (f"case {s.value}", replace(ACTIVE, state=s), {}, f"forbidden:case {s.value}")
        for s in CaseState
        if s is not CaseState.ACTIVE
    ],
    (
        "other justification",
        ACTIVE,
        {"justification": "break_glass"},
        "forbidden:justification break_glass vs case legal_request",
    ),
    (
        "key outside the scope",
        ACTIVE,
        {"key": replace(KEY, key_id="k-2")},
        "forbidden:key out of scope",
    ),
    (
        "context outside the scope",
        ACTIVE,
        {"context": {"patient": "p2"}},
        "forbidden:context out of scope",
    ),
    ("budget used by this request", ACTIVE, {"earlier": 2}, "forbidden:unwrap budget used up"),
    (
        "budget used before",
        replace(ACTIVE, case=_case(unwraps_used=2)),
        {},
        "forbidden:unwrap budget used up",
    ),
    (
        "approvals lost",
        replace(ACTIVE, approvals_hold=False, reason="quorum no longer holds"),
        {},
        "forbidden:quorum no longer holds",
    ),
    (
        "case edited in the database",
        replace(ACTIVE, approvals_hold=False, reason="case altered in the database"),
        {},
        "forbidden:case altered in the database",
    ),
    (
        "disabled key",
        ACTIVE,
        {"key": replace(KEY, state=KeyState.DISABLED)},
        "key_state:state=disabled",
    ),
    (
        "case before key state",
        replace(ACTIVE, state=CaseState.EXPIRED),
        {"key": replace(KEY, state=KeyState.DISABLED)},
        "forbidden:case expired",
    ),
]


@pytest.mark.parametrize(
    ("name", "standing", "changes", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_escrow_case(
    name: str, standing: CaseStanding | None, changes: dict[str, object], expected: str | None
) -> None:
    assert _under_case(standing, **changes) == expected  # type: ignore[arg-type]


def test_a_case_scope_naming_blobs_admits_only_those() -> None:
    import hashlib

    named = _case(
        scope={"keys": ["k-1"], "context": None, "blobs": [hashlib.sha256(b"blob").hexdigest()]}
    )
    assert _under_case(CaseStanding(named, CaseState.ACTIVE, True)) is None
    other = _case(scope={"keys": ["k-1"], "context": None, "blobs": ["00" * 32]})
    assert _under_case(CaseStanding(other, CaseState.ACTIVE, True)) == "forbidden:blob out of scope"


# -- the caller, before any key -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "justification", "case_id", "expected"),
    [
        (Role.SERVICE, "service_processing", None, None),
        (Role.SERVICE, "no_such_code", None, InvalidRequest),
        (Role.SERVICE, "legal_request", None, Forbidden),
        (Role.SERVICE, "break_glass", None, Forbidden),
        (Role.SERVICE, "legal_request", "c-1", Forbidden),  # cases are for requesters
        (Role.REQUESTER, "legal_request", "c-1", None),
        (Role.REQUESTER, "service_processing", None, Forbidden),  # only under a case
        (Role.REQUESTER, "legal_request", None, Forbidden),
    ],
)
def test_check_caller(
    role: Role, justification: str, case_id: str | None, expected: type[Exception] | None
) -> None:
    if expected is None:
        check_caller(role, justification, case_id)
    else:
        with pytest.raises(expected):
            check_caller(role, justification, case_id)


def test_the_value_objects_answer_their_questions() -> None:
    assert KEY.usable_for(2) and KEY.usable_for(3) and not KEY.usable_for(1)
    grant = Grant(frozenset({"decrypt"}), frozenset({"service_processing"}))
    assert grant.allows(Permission.DECRYPT)
    assert grant.allows(Permission.DECRYPT, "service_processing")
    assert not grant.allows(Permission.DECRYPT, "backup_restore")
    assert not grant.allows(Permission.REWRAP)
    assert isinstance(decide(KEY, grant, Use(Permission.REWRAP, 3)), Forbidden)
    assert isinstance(
        decide(replace(KEY, state=KeyState.DISABLED), grant, Use(Permission.DECRYPT, 3)),
        KeyStateError,
    )
    assert isinstance(decide(KEY, grant, Use(Permission.DECRYPT, 1)), KeyVersionRetired)
