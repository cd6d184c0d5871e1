"""PKCS#11 attribute templates of every object the KMS creates.

These are the promises the first guarantee (the cloud host cannot read: docs/design.md,
SECURITY.md) rests on: the root key and the audit signing key are sensitive and never
extractable; a KEK exists in clear only inside the HSM, leaves it only wrapped under the
root key, and is unwrapped into a non-extractable session object.
A production HSM must honour every attribute here (check with ``pkcs11-tool -O``).
"""

from __future__ import annotations

from typing import Any

from pkcs11 import Attribute, KeyType, ObjectClass

_NO_OTHER_USE = {
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}

# AES-256 root key: token object, usable only to wrap and unwrap KEKs.
ROOT_KEY = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
    Attribute.WRAP: True,
    Attribute.UNWRAP: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    **_NO_OTHER_USE,
}

# A freshly generated KEK: a session object, extractable only so the root key can wrap it;
# destroyed right after wrapping.
KEK_TO_WRAP = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    **_NO_OTHER_USE,
}

# A KEK unwrapped for use: session object, never extractable, GCM encrypt/decrypt only.
KEK_IN_USE = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    **_NO_OTHER_USE,
}

# The template a KEK is unwrapped with (pkcs11_calls.unwrap_key sets class and type here).
KEK_UNWRAPPED = {
    Attribute.CLASS: ObjectClass.SECRET_KEY,
    Attribute.KEY_TYPE: KeyType.AES,
    **KEK_IN_USE,
}

# What the root key lets an unwrapped key be (CKA_UNWRAP_TEMPLATE), on modules that honour
# it: a PIN holder cannot unwrap a KEK as extractable, to read it out of the HSM.
ROOT_UNWRAP_TEMPLATE = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
}

# A session AES-256 key per worker session for the readiness probe's GCM round trip.
PROBE_KEY = {
    Attribute.CLASS: ObjectClass.SECRET_KEY,
    Attribute.KEY_TYPE: KeyType.AES,
    Attribute.VALUE_LEN: 32,
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    **_NO_OTHER_USE,
}

# The HSM anchors (audit head, sealed state) are private token objects holding a value,
# never modifiable: a data object's CKA_VALUE ("data"), or, on modules that refuse private
# token data objects (NSS softokn), the CKA_ID of a sensitive generic secret that can do
# nothing ("secret_key"). form: (class, the attribute holding the value, the template).
ANCHOR_FORMS: dict[str, tuple[ObjectClass, Attribute, dict[Attribute, Any]]] = {
    "data": (
        ObjectClass.DATA,
        Attribute.VALUE,
        {Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.MODIFIABLE: False},
    ),
    "secret_key": (
        ObjectClass.SECRET_KEY,
        Attribute.ID,
        {
            Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.MODIFIABLE: False,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.VALUE: bytes(32),
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.DERIVE: False,
        },
    ),
}

# HMAC-SHA256 key that seals database rows the escrow procedure trusts (custodian keys,
# case state), so a database alone cannot forge them. Token object, sign/verify only.
INTEGRITY_KEY = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}

# EC P-256 audit signing key pair: the private half signs checkpoints and never leaves.
AUDIT_PRIVATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
AUDIT_PUBLIC = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}
