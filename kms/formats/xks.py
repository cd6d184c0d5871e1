"""Wire formats of the AWS External Key Store (XKS) proxy API, specification v1.0.3.

Endpoints (all ``POST``, JSON bodies, ``Content-Type: application/json``), under
``[<prefix>]/kms/xks/v1``::

    /health                           {requestMetadata}
                                      -> {xksProxyFleetSize, xksProxyVendor, xksProxyModel,
                                          ekmVendor, ekmFleetDetails: [{id, model, healthStatus}]}
    /keys/<externalKeyId>/metadata    {requestMetadata} -> {keySpec, keyUsage, keyStatus}
    /keys/<externalKeyId>/encrypt     {requestMetadata, plaintext, encryptionAlgorithm,
                                       additionalAuthenticatedData?,
                                       ciphertextDataIntegrityValueAlgorithm?}
                                      -> {ciphertext, initializationVector, authenticationTag,
                                          ciphertextMetadata, ciphertextDataIntegrityValue?}
    /keys/<externalKeyId>/decrypt     {requestMetadata, ciphertext, encryptionAlgorithm,
                                       initializationVector, authenticationTag,
                                       ciphertextMetadata?, additionalAuthenticatedData?}
                                      -> {plaintext}

Binary fields are standard base64 with padding. Errors are ``{"errorName", "errorMessage"}``.
``externalKeyId`` is 1-128 characters of ``[A-Za-z0-9._-]``.

This module defines the byte-level parts, which are ours to choose within the spec:

``ciphertextMetadata`` (format version 1, 5 bytes; the spec allows at most 20)::

    offset  size  field
    0       1     format version = 1
    1       4     key version, unsigned big-endian (1 .. 2^32-1)

AES-GCM additional authenticated data given to the HSM (the spec's recommended layout, so
the metadata is authenticated and "no AAD, metadata X" differs from "AAD X, no metadata")::

    uint16_be(len(AAD)) || AAD || uint8(len(md)) || md

AAD is at most MAX_AAD_BYTES (16384 = 0x4000), so the first byte of this layout is at most
0x40 and never ``K`` (0x4B), the first byte of the native blob header ``KMSW``: the same KEK
serves both faces, and an XKS ciphertext can never be presented as a native blob or the
other way round. A change to this layout needs a new metadata format version.

Ciphertext data integrity value (CDIV, spec Appendix C): SHA-256 over the decoded bytes
``AAD || ciphertextMetadata || IV || ciphertext || tag`` (absent fields are empty, no
lengths), returned only when the request asks for ``SHA_256``.

The URI prefix (``KMS_XKS_URI_PREFIX``) follows AWS's ``XksProxyUriPath`` rule: the path
``<prefix>/kms/xks/v1`` must match ``^(/[a-zA-Z0-9/_-]+)?/kms/xks/v1$`` and be at most 128
characters; we also refuse empty path segments and a first segment that this server
already uses for its own endpoints.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

IV_BYTES = 12
TAG_BYTES = 16
ALLOWED_IV_BYTES = (12, 16)
MAX_CIPHERTEXT_METADATA_BYTES = 20
METADATA_VERSION = 1
# Our limits, above the spec minimums (4300-byte plaintext, 8192-byte AAD); larger input
# is answered with UnsupportedOperationException (501), as the spec says.
MAX_PLAINTEXT_BYTES = 8192
MAX_AAD_BYTES = 16384
API_PATH = "/kms/xks/v1"
MAX_URI_PATH = 128
EXTERNAL_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_PREFIX = re.compile(r"(/[A-Za-z0-9_-]+)+")
RESERVED_PREFIX_SEGMENTS = frozenset({"v1", "healthz", "readyz", "metrics", "dashboard", "static"})
USAGES = ("encrypt", "decrypt")
_KMS_OPERATION = re.compile(r"[A-Za-z]{1,64}")
MAX_POLICY_ENTRIES = 100
MAX_PATTERN = 2048


class XksFormatError(ValueError):
    """A value does not have the layout this module defines; str() says why."""


# -- ciphertext metadata, HSM AAD, CDIV ----------------------------------------------------


def encode_metadata(key_version: int) -> bytes:
    """The ciphertextMetadata (format version 1) naming ``key_version``."""
    if not 1 <= key_version < 2**32:
        raise XksFormatError("key version out of range")
    return bytes([METADATA_VERSION]) + struct.pack(">I", key_version)


def decode_metadata(md: bytes) -> int:
    """The key version in a ciphertextMetadata; XksFormatError if it is not version 1."""
    if len(md) != 5 or md[0] != METADATA_VERSION:
        raise XksFormatError("unknown ciphertext metadata format")
    (version,) = struct.unpack(">I", md[1:])
    if version < 1:
        raise XksFormatError("key version out of range")
    return int(version)


def hsm_aad(aad: bytes, md: bytes) -> bytes:
    """``uint16_be(len(aad)) || aad || uint8(len(md)) || md`` (see the module docstring)."""
    if len(aad) > MAX_AAD_BYTES or len(md) > MAX_CIPHERTEXT_METADATA_BYTES:
        raise XksFormatError("AAD or ciphertext metadata too long")
    return struct.pack(">H", len(aad)) + aad + bytes([len(md)]) + md


def cdiv(aad: bytes, md: bytes, iv: bytes, ciphertext: bytes, tag: bytes) -> bytes:
    """The SHA-256 ciphertext data integrity value of an encrypt response."""
    return hashlib.sha256(aad + md + iv + ciphertext + tag).digest()


# -- URI prefix -----------------------------------------------------------------------------


def check_uri_prefix(prefix: str) -> str:
    """``prefix`` if ``<prefix>/kms/xks/v1`` is a valid XksProxyUriPath for this server
    (empty is valid); XksFormatError naming the rule otherwise."""
    if prefix == "":
        return prefix
    if not _PREFIX.fullmatch(prefix):
        raise XksFormatError(
            "must be empty or start with '/' and hold only letters, digits, '_', '-' and "
            "'/' between non-empty segments, without a trailing '/'"
        )
    if len(prefix + API_PATH) > MAX_URI_PATH:
        raise XksFormatError(f"<prefix>{API_PATH} must be at most {MAX_URI_PATH} characters")
    if prefix.split("/")[1] in RESERVED_PREFIX_SEGMENTS:
        raise XksFormatError(
            "must not start with a path this server already uses ("
            + ", ".join(sorted(RESERVED_PREFIX_SEGMENTS))
            + ")"
        )
    return prefix


# -- request metadata and its audit form ----------------------------------------------------


@dataclass(frozen=True)
class RequestMetadata:
    """The ``requestMetadata`` fields this server records (unknown fields are ignored)."""

    kms_request_id: str
    kms_operation: str
    aws_principal_arn: str | None = None
    kms_key_arn: str | None = None
    kms_via_service: str | None = None


# Per-field caps in the audit detail (the record's detail holds at most 256 characters).
_CAPS = (("rid", 40), ("op", 32), ("principal", 56), ("key", 80), ("via", 16))
MAX_DETAIL = 256


def _printable(value: str, lowest: str = "!") -> str:
    """``value`` with every character outside ``lowest`` .. ``~`` replaced by ``?``."""
    return "".join(c if lowest <= c <= "~" else "?" for c in value)


def shorten(value: str, cap: int) -> str:
    """``value`` in at most ``cap`` printable ASCII characters. An ARN that is too long keeps
    its head up to the account (``arn:aws:iam::123456789012:``) when that fits in half the
    cap, then ``...``, then as much of its tail (the resource name) as fits."""
    value = _printable(value)
    if len(value) <= cap:
        return value
    parts = value.split(":")
    head = ":".join(parts[:5]) + ":" if value.startswith("arn:") and len(parts) > 5 else ""
    if not head or len(head) > cap // 2:
        head = value[: cap // 3]
    return head + "..." + value[len(value) - (cap - len(head) - 3) :]


def audit_detail(meta: RequestMetadata, reason: str | None = None) -> str:
    """The audit record detail of an XKS request, at most 256 characters::

        xks rid=<kmsRequestId> op=<kmsOperation> principal=<awsPrincipalArn>
            key=<kmsKeyArn> via=<kmsViaService>[ | <reason>]

    on one line; absent fields are left out, each value is capped (long ARNs keep their
    account and resource name), and only printable ASCII is kept."""
    values = (
        meta.kms_request_id,
        meta.kms_operation,
        meta.aws_principal_arn,
        meta.kms_key_arn,
        meta.kms_via_service,
    )
    parts = ["xks"] + [
        f"{label}={shorten(value, cap)}"
        for (label, cap), value in zip(_CAPS, values, strict=True)
        if value is not None
    ]
    text = " ".join(parts)
    if reason:
        text += " | " + _printable(reason, lowest=" ")
    return text[:MAX_DETAIL]


# -- the per-key XKS policy -----------------------------------------------------------------


@dataclass(frozen=True)
class XksKeyPolicy:
    """What the XKS face may do with one key, on top of the caller's grant.

    ``usage``: the XKS operations allowed (a subset of ``encrypt``, ``decrypt``; empty means
    neither). ``aws_principals``: if set, ``awsPrincipalArn`` must match one of these
    shell-style patterns (``fnmatch``, case-sensitive, ``*`` also matches ``/`` and ``:``).
    ``kms_operations``: if set, ``kmsOperation`` must be one of these names. None means
    any. The default (no row stored) allows both usages for any principal and operation.
    """

    usage: frozenset[str] = frozenset(USAGES)
    aws_principals: tuple[str, ...] | None = None
    kms_operations: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.usage <= set(USAGES):
            raise XksFormatError("usage must be among: " + ", ".join(USAGES))
        for name, values in (
            ("aws_principals", self.aws_principals),
            ("kms_operations", self.kms_operations),
        ):
            if values is not None and len(values) > MAX_POLICY_ENTRIES:
                raise XksFormatError(f"{name} holds more than {MAX_POLICY_ENTRIES} entries")
        for pattern in self.aws_principals or ():
            if not 1 <= len(pattern) <= MAX_PATTERN or _printable(pattern) != pattern:
                raise XksFormatError(
                    f"aws_principals entries are 1-{MAX_PATTERN} printable ASCII characters"
                )
        for op in self.kms_operations or ():
            if not _KMS_OPERATION.fullmatch(op):
                raise XksFormatError("kms_operations entries are KMS API names (letters only)")

    def principal_allowed(self, arn: str | None) -> bool:
        if self.aws_principals is None:
            return True
        return arn is not None and any(fnmatch.fnmatchcase(arn, p) for p in self.aws_principals)

    def operation_allowed(self, operation: str) -> bool:
        return self.kms_operations is None or operation in self.kms_operations

    def summary(self) -> str:
        """A one-line description for the audit trail (truncated by the caller)."""

        def listed(values: Iterable[str] | None) -> str:
            return "any" if values is None else ",".join(values) or "none"

        return (
            f"usage={','.join(u for u in USAGES if u in self.usage) or 'none'} "
            f"kms_operations={listed(self.kms_operations)} "
            f"aws_principals={listed(self.aws_principals)}"
        )
