"""PKCS#11 attribute templates of every object the KMS creates.

These are the promises the first guarantee (the cloud host cannot read: docs/design.md,
SECURITY.md) rests on: the root key and the audit signing key are sensitive and never
extractable; a KEK exists in clear only inside the HSM, leaves it only wrapped under the
root key, and is unwrapped into a non-extractable session object.
A production HSM must honour every attribute here (check with ``pkcs11-tool -O``).
"""

from __future__ import annotations

from pkcs11 import Attribute

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
