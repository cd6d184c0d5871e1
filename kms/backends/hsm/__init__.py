"""PKCS#11 HSM backend.

- pkcs11_hsm.py: ``Pkcs11Hsm``, the Hsm port, and its per-process session rules;
- pkcs11_errors.py: which PKCS#11 errors mean bad data, a reconnect, or a rejected PIN;
- provision.py: ``provision_keys``, creating the token keys during ``kms init``.
"""

from kms.backends.hsm.pkcs11_hsm import HsmConfig, Pkcs11Hsm
from kms.backends.hsm.provision import provision_keys

__all__ = ["HsmConfig", "Pkcs11Hsm", "provision_keys"]
