"""Creating the long-lived token keys (root, integrity, audit signing) during
``kms init``. Never run in a server worker, which only uses keys that exist."""

from __future__ import annotations

import os
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from hsm_config import templates
from kms.backends.hsm import pkcs11_calls as raw
from kms.backends.hsm.hsm_settings import HsmConfig
from kms.backends.hsm.pkcs11_errors import describe
from kms.errors import HsmUnavailable


def provision_keys(config: HsmConfig) -> list[str]:
    """Create the root key, the integrity key and the audit signing key pair if absent;
    return what was created. The caller runs the preflight (preflight.py) first, so a
    module that lacks a mechanism fails before anything is created.

    Runs in its own short-lived process step (``kms init``), never in a server worker.
    """
    if config.softhsm2_conf:
        os.environ["SOFTHSM2_CONF"] = config.softhsm2_conf
    created: list[str] = []
    try:
        lib = pkcs11.lib(config.module)
        token = lib.get_token(token_label=config.token_label)
        with token.open(rw=True, user_pin=config.pin) as session:
            if not _exists(session, ObjectClass.SECRET_KEY, config.root_label):
                _generate_root(raw.Calls(lib), session, config)
                created.append(config.root_label)
            if not _exists(session, ObjectClass.SECRET_KEY, config.integrity_label):
                session.generate_key(
                    KeyType.GENERIC_SECRET,
                    256,
                    label=config.integrity_label,
                    store=True,
                    template=templates.INTEGRITY_KEY,
                )
                created.append(config.integrity_label)
            if not _exists(session, ObjectClass.PRIVATE_KEY, config.audit_label):
                params = session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                    local=True,
                )
                params.generate_keypair(
                    store=True,
                    label=config.audit_label,
                    public_template=templates.AUDIT_PUBLIC,
                    private_template=templates.AUDIT_PRIVATE,
                )
                created.append(config.audit_label)
    except p11e.PKCS11Error as e:
        raise HsmUnavailable(detail=f"provisioning failed: {describe(e)}") from e
    return created


def _generate_root(calls: raw.Calls, session: Any, config: HsmConfig) -> None:
    """The AES-256 root key; with an unwrap template where the profile says the module
    honours one (hsm_config/README.md), so a PIN holder cannot unwrap a KEK as
    extractable. python-pkcs11 cannot express a nested template, so this goes through
    pkcs11_calls.py."""
    template: dict[Any, Any] = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE_LEN: 32,
        Attribute.LABEL: config.root_label,
        **templates.ROOT_KEY,
    }
    if config.unwrap_template:
        template[raw.CKA_UNWRAP_TEMPLATE] = templates.ROOT_UNWRAP_TEMPLATE
    raw.generate_key(calls, session.handle, Mechanism.AES_KEY_GEN, template)


def _exists(session: Any, object_class: ObjectClass, label: str) -> bool:
    try:
        session.get_key(object_class=object_class, label=label)
    except p11e.NoSuchKey:
        return False
    return True
