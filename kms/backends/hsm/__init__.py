"""PKCS#11 HSM backend.

- hsm_settings.py: ``HsmConfig``, the module, token, labels and mechanism profile;
- pkcs11_hsm.py: ``Pkcs11Hsm``, the Hsm port, and its per-process session rules;
- pkcs11_calls.py: the calls made through ctypes (GCM, wrap, unwrap, nested templates);
- pkcs11_anchors.py: the token objects the server writes (audit and state anchors);
- pkcs11_session.py: resetting the module in a process and logging in;
- pkcs11_errors.py: which PKCS#11 errors mean bad data, a reconnect, or a rejected PIN;
- preflight.py: the checks ``kms init`` and ``kms serve`` run before anything else;
- provision.py: ``provision_keys``, creating the token keys during ``kms init``.
"""

from kms.backends.hsm.hsm_settings import HsmConfig
from kms.backends.hsm.pkcs11_hsm import Pkcs11Hsm
from kms.backends.hsm.provision import provision_keys

__all__ = ["HsmConfig", "Pkcs11Hsm", "provision_keys"]
