"""Fixtures for the second PKCS#11 implementation: NSS softokn through p11-kit's proxy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pkcs11
import pytest

from hsm_config import profiles
from kms.backends.hsm import HsmConfig, Pkcs11Hsm, preflight, provision_keys
from tests.nss_token import NssToken, make_nss_token

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib


@pytest.fixture(scope="session")
def nss_token(tmp_path_factory: pytest.TempPathFactory) -> NssToken:
    """One NSS database per test run; this process's p11-kit is pointed at it."""
    token = make_nss_token(tmp_path_factory.mktemp("nss"))
    token.activate()
    return token


@pytest.fixture(scope="session")
def nss_lib(nss_token: NssToken) -> Iterator[Pkcs11Lib]:
    """python-pkcs11's handle on the proxy, initialized (finalized at the end of the run)."""
    lib = pkcs11.lib(nss_token.module_path)
    yield lib
    pkcs11.unload(nss_token.module_path)


def nss_config(token: NssToken) -> HsmConfig:
    """The backend's configuration for the NSS token, with the nss profile's mechanisms."""
    profile = profiles.profile("nss")
    return HsmConfig(
        module=token.module_path,
        token_label=token.token_label,
        pin=token.pin,
        wrap_mechanism=profile.wrap_mechanism,
        gcm_iv=profile.gcm_iv,
        unwrap_template=profile.unwrap_template,
        anchor_object=profile.anchor_object,
    )


@pytest.fixture(scope="session")
def nss_hsm(nss_token: NssToken, nss_lib: Pkcs11Lib) -> Iterator[Pkcs11Hsm]:
    """The backend on the NSS token, after the preflight and ``kms init``'s provisioning
    (in this process: the proxy is pointed at the token here only)."""
    config = nss_config(nss_token)
    preflight.check(config, lambda step: None)
    assert provision_keys(config) == ["kms-root", "kms-integrity", "kms-audit-signing"]
    backend = Pkcs11Hsm(config)
    yield backend
    backend.close()


@pytest.fixture(params=["softhsm", "nss"])
def backend(request: pytest.FixtureRequest) -> Pkcs11Hsm:
    """The backend on each real PKCS#11 implementation in turn."""
    name = "hsm" if request.param == "softhsm" else "nss_hsm"
    hsm: Pkcs11Hsm = request.getfixturevalue(name)
    return hsm
