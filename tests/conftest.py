"""Fixtures: one real SoftHSM token per test session (made by the real ``kms init``), a
fresh SQLite database per test, the Flask app wired to both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kms import config
from kms.app import create_app, hsm_config
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage, make_engine, upgrade
from kms.services.principals import PrincipalService
from tests.helpers import Api, init_data_dir


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_data_dir(tmp_path_factory.mktemp("kms-data"))


@pytest.fixture(scope="session")
def settings(data_dir: Path) -> config.Settings:
    return config.from_env({"KMS_DATA_DIR": str(data_dir), "KMS_SQLITE_SYNCHRONOUS": "NORMAL"})


@pytest.fixture(scope="session")
def hsm(settings: config.Settings) -> Iterator[Pkcs11Hsm]:
    backend = Pkcs11Hsm(hsm_config(settings))
    yield backend
    backend.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "kms.sqlite3"


@pytest.fixture
def storage(db_path: Path) -> Iterator[SqlStorage]:
    engine = make_engine(f"sqlite:///{db_path}", "NORMAL")
    upgrade(engine)
    yield SqlStorage(engine)
    engine.dispose()


@pytest.fixture
def app(settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage):  # type: ignore[no-untyped-def]
    return create_app(settings, hsm=hsm, storage=storage)


@pytest.fixture
def api(app) -> Api:  # type: ignore[no-untyped-def]
    principals: PrincipalService = app.extensions["kms"].principals
    token = principals.bootstrap_admin("admin")
    assert token is not None
    return Api(app.test_client(), token)
