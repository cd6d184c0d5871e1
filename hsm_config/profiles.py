"""Mechanism profiles: how one PKCS#11 implementation does what the KMS needs.

A profile names the key-wrap mechanism that wraps new KEKs under the root key, where the
AES-GCM IV comes from, and whether the root key gets a ``CKA_UNWRAP_TEMPLATE``. The
setting ``KMS_HSM_PROFILE`` picks one; ``KMS_HSM_WRAP_MECHANISM`` and ``KMS_HSM_GCM_IV``
override its parts. hsm_config/README.md has the table and what each was checked against.

Every wrapped KEK records the mechanism that wrapped it (kms/services/model.py), so a
change of profile only changes how *new* KEKs are wrapped: older ones are unwrapped with
the mechanism they name.
"""

from __future__ import annotations

from dataclasses import dataclass

# Standard AES key-wrap mechanisms (PKCS#11 v2.40 / v3.0 pkcs11t.h). The same constant does
# not mean the same format everywhere: SoftHSM's _PAD is RFC 5649, NSS's _PAD is RFC 3394
# over PKCS#7 padding. A profile says which format its module produces.
WRAP_MECHANISMS = {
    "CKM_AES_KEY_WRAP": 0x2109,
    "CKM_AES_KEY_WRAP_PAD": 0x210A,
    "CKM_AES_KEY_WRAP_KWP": 0x210B,
}
CKM_VENDOR_DEFINED = 0x80000000
IV_SOURCES = ("caller", "hsm")


def mechanism_number(name: str) -> int:
    """The PKCS#11 number of a wrap mechanism name, or of a vendor constant written in hex
    (``0x8000....``). ValueError with the accepted forms otherwise."""
    if name in WRAP_MECHANISMS:
        return WRAP_MECHANISMS[name]
    try:
        number = int(name, 16) if name.lower().startswith("0x") else -1
    except ValueError:
        number = -1
    if number < CKM_VENDOR_DEFINED or number > 0xFFFFFFFF:
        raise ValueError(
            f"unknown wrap mechanism {name!r}: use one of {', '.join(WRAP_MECHANISMS)} "
            "or a vendor constant in hex (0x80000000 to 0xffffffff)"
        )
    return number


def mechanism_name(number: int) -> str:
    """The name recorded for a wrap mechanism number (inverse of mechanism_number)."""
    for name, value in WRAP_MECHANISMS.items():
        if value == number:
            return name
    return f"0x{number:08x}"


@dataclass(frozen=True)
class Profile:
    """What one PKCS#11 implementation needs. ``tested`` says whether ``make test`` runs
    the KMS on it; ``source`` is the public document the mechanisms were checked against."""

    name: str
    wrap_mechanism: str
    wrap_format: str
    gcm_iv: str  # "caller": the KMS supplies the IV; "hsm": the module writes its own
    unwrap_template: bool  # the root key is created with CKA_UNWRAP_TEMPLATE
    tested: bool
    source: str
    notes: str = ""
    anchor_object: str = "data"  # templates.ANCHOR_FORMS: how the token stores anchors


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "softhsm",
            "CKM_AES_KEY_WRAP_PAD",
            "RFC 5649",
            "caller",
            True,
            True,
            "SoftHSM 2.6.1 (Debian bookworm), pkcs11-tool -M",
            "No _KWP constant; enforces CKA_UNWRAP_TEMPLATE.",
        ),
        Profile(
            "nss",
            "CKM_AES_KEY_WRAP_KWP",
            "RFC 5649",
            "caller",
            False,
            True,
            "NSS softokn 3.87 (Debian bookworm) through p11-kit-proxy, pkcs11-tool -M",
            "_PAD is RFC 3394 over PKCS#7 padding and refuses RFC 5649 blobs: use _KWP. "
            "Refuses private token data objects: anchors are kept as secret-key objects.",
            anchor_object="secret_key",
        ),
        Profile(
            "luna",
            "0x80000171",  # Luna CKM_AES_KWP = CKM_VENDOR_DEFINED + 0x171
            "RFC 5649",
            "caller",
            False,
            False,
            "Thales Luna Network HSM 7 SDK reference: CKM_AES_KW and CKM_AES_GCM pages "
            "(thalesdocs.com/gphsm/luna/7/docs/network/Content/sdk/mechanisms/); "
            "Thales Luna client header: CKM_AES_KW = VENDOR+0x170, CKM_AES_KWP = VENDOR+0x171 "
            "('identical to CKM_AES_KEY_WRAP_KWP', RFC 5649)",
            "Not tested. Check on the partition: CKM_AES_KWP (0x80000171) listed for wrap and "
            "unwrap (the standard CKM_AES_KEY_WRAP_KWP 0x210b may also be offered: same "
            "format). GCM: with HSM policy 12 'Allow non-FIPS algorithms' = 0 (FIPS mode) the "
            "HSM generates a 16-byte IV itself, which does not fit the KMS's 12-byte IV: use "
            "a partition whose HSM allows caller IVs, or confirm on the device what it does. "
            "CKA_UNWRAP_TEMPLATE support is not documented in the pages found: left off.",
        ),
        Profile(
            "cloudhsm",
            "0x8000216f",  # CKM_CLOUDHSM_AES_KEY_WRAP_ZERO_PAD = CKM_VENDOR_DEFINED | 0x216F
            "RFC 5649",
            "hsm",
            True,
            False,
            "AWS CloudHSM User Guide: 'Supported mechanisms for the PKCS #11 library for "
            "Client SDK 5' (docs.aws.amazon.com/cloudhsm/latest/userguide/"
            "pkcs11-mechanisms.html), 'AES key wrapping in AWS CloudHSM' "
            "(manage-aes-key-wrapping.html), 'Understanding trusted keys' "
            "(understand-trusted-key-wraps.html); cloudhsm_pkcs11_vendor_defs.h in "
            "aws-samples/aws-cloudhsm-pkcs11-examples",
            "Not tested. SDK 5 lists only vendor AES key-wrap mechanisms for C_WrapKey: "
            "_NO_PAD 0x80002109 (RFC 3394), _PKCS5_PAD 0x8000210a (PKCS#5, no RFC), "
            "_ZERO_PAD 0x8000216f (RFC 5649, implicit IV only). GCM: the HSM refuses a "
            "caller IV and writes a 12-byte IV into CK_GCM_PARAMS.pIv; CKM_AES_GCM data is "
            "limited to 16224 bytes and CKM_SHA256_HMAC to 16288 bytes. CKA_UNWRAP_TEMPLATE "
            "is documented together with CKA_TRUSTED (set by an admin/CO): check that "
            "C_GenerateKey accepts it and that an extractable unwrap is refused. Check that "
            "CKO_DATA token objects can be created (preflight does).",
        ),
        Profile(
            "proteccio",
            "CKM_AES_KEY_WRAP",
            "RFC 3394",
            "caller",
            False,
            False,
            "No public Proteccio mechanism list found (Eviden documentation is customer-only); "
            "values are PKCS#11 v2.40 standard mechanisms",
            "Not tested, not checked against vendor documentation. CKM_AES_KEY_WRAP (RFC 3394, "
            "no padding) is chosen because a 32-byte KEK needs no padding and its format is "
            "the same everywhere, unlike _PAD. Check with `pkcs11-tool -M` that it is offered "
            "for wrap/unwrap; prefer CKM_AES_KEY_WRAP_KWP if listed (set "
            "KMS_HSM_WRAP_MECHANISM). Check that CKM_AES_GCM accepts a caller 12-byte IV, "
            "CKM_ECDSA on P-256, CKM_SHA256_HMAC, CKO_DATA objects, and whether "
            "CKA_UNWRAP_TEMPLATE is honoured.",
        ),
    )
}


def profile(name: str) -> Profile:
    """The named profile; ValueError listing the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown HSM profile {name!r}: choose one of {', '.join(sorted(PROFILES))}"
        ) from None
