"""``HsmConfig``: which module, token, labels and mechanism profile the backend uses."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HsmConfig:
    """Which PKCS#11 module and token to use, and the labels of the objects in it. The PIN
    is left out of ``repr``."""

    module: str
    token_label: str
    pin: str = field(repr=False)
    root_label: str = "kms-root"
    audit_label: str = "kms-audit-signing"
    integrity_label: str = "kms-integrity"
    kek_cache_size: int = 1024
    softhsm2_conf: str | None = None
    # The mechanism profile (hsm_config/profiles.py): how new KEKs are wrapped, where GCM
    # IVs come from, whether the root key is created with an unwrap template.
    wrap_mechanism: str = "CKM_AES_KEY_WRAP_PAD"
    gcm_iv: str = "caller"
    unwrap_template: bool = True
    liveness_seconds: float = 2.0
    anchor_object: str = "data"  # templates.ANCHOR_FORMS: how the token stores anchors
