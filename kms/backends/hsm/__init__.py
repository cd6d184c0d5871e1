"""PKCS#11 HSM backend."""

from kms.backends.hsm.pkcs11_hsm import HsmConfig, Pkcs11Hsm, provision_keys

__all__ = ["HsmConfig", "Pkcs11Hsm", "provision_keys"]
