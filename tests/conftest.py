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
from kms.services.seals import RowSeals
from tests.helpers import Api, Receiver, anchored, init_data_dir


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
def storage(db_path: Path, hsm: Pkcs11Hsm) -> Iterator[SqlStorage]:
    """A fresh database whose audit chain is anchored in the session's token (as ``kms
    init`` anchors it), the anchor destroyed afterwards."""
    engine = make_engine(f"sqlite:///{db_path}", "NORMAL")
    upgrade(engine)
    store = SqlStorage(engine, RowSeals(hsm))
    with anchored(store, hsm):
        yield store
    engine.dispose()


@pytest.fixture
def app(settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage):  # type: ignore[no-untyped-def]
    return create_app(settings, hsm=hsm, storage=storage)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A real local HTTP server standing for the data owner's webhook receiver."""
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def api(app) -> Api:  # type: ignore[no-untyped-def]
    principals: PrincipalService = app.extensions["kms"].principals
    token = principals.bootstrap_admin("admin")
    assert token is not None
    return Api(app.test_client(), token)


# -- PostgreSQL (tests/pg.py): one throwaway cluster per session, started on first use ---
# KMS_TEST_POSTGRES=0 skips these tests; otherwise a missing PostgreSQL is an error.


@pytest.fixture(scope="session")
def pg_cluster():  # type: ignore[no-untyped-def]
    import atexit
    import os

    from tests.pg import PgCluster

    if os.environ.get("KMS_TEST_POSTGRES") == "0":
        pytest.skip("KMS_TEST_POSTGRES=0")
    cluster = PgCluster.create()
    atexit.register(cluster.destroy)  # also if the session dies before teardown
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_template(pg_cluster) -> str:  # type: ignore[no-untyped-def]
    """A database at the newest schema, copied for each test (CREATE DATABASE ... TEMPLATE)."""
    pg_cluster.create_database("kms_template")
    engine = make_engine(pg_cluster.url("kms_template"))
    upgrade(engine)
    engine.dispose()  # a template must have no open connection while it is copied
    return "kms_template"


@pytest.fixture
def pg_database(pg_cluster, pg_template):  # type: ignore[no-untyped-def]
    """A fresh PostgreSQL database at the newest schema (tests.pg.PgDatabase), dropped after."""
    from tests.pg import PgDatabase, fresh_name

    name = fresh_name()
    pg_cluster.create_database(name, template=pg_template)
    yield PgDatabase(pg_cluster, name)
    pg_cluster.drop_database(name)


@pytest.fixture
def pg_storage(pg_database, hsm) -> Iterator[SqlStorage]:  # type: ignore[no-untyped-def]
    engine = make_engine(pg_database.url, "NORMAL")
    store = SqlStorage(engine, RowSeals(hsm))
    with anchored(store, hsm):
        yield store
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    """A fresh database of each backend (the test runs once per backend)."""
    if request.param == "sqlite":
        return f"sqlite:///{db_path}"
    return str(request.getfixturevalue("pg_database").url)


@pytest.fixture
def any_engine(any_database_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(any_database_url, "NORMAL")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def any_storage(any_engine, hsm) -> Iterator[SqlStorage]:  # type: ignore[no-untyped-def]
    store = SqlStorage(any_engine, RowSeals(hsm))
    with anchored(store, hsm):
        yield store


# -- Redis (tests/redis_server.py): one real redis-server per session, on first use -------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:  # type: ignore[no-untyped-def]
    """The session's Redis, emptied for this test (KMS_REDIS_URL)."""
    redis_server.flush()
    return str(redis_server.url)


@pytest.fixture
def own_redis(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A redis-server of this test alone, which the test may stop and start again."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    server.flush()
    try:
        yield server
    finally:
        server.stop()
