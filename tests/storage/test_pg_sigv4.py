"""tests/functional/test_sigv4.py again, on PostgreSQL: credentials, verification, replay
refusal. The two tests that open the SQLite file have their PostgreSQL versions here (the
secret is not in a dump of the database; a nonce store the database refuses fails
closed)."""

from __future__ import annotations

from typing import Any

import pytest

from kms.backends.storage import SqlStorage
from kms.errors import StorageUnavailable
from tests.functional import test_sigv4 as base
from tests.helpers import Api
from tests.pg import PgDatabase, rerun

globals().update(
    rerun(
        base,
        skip={
            "test_secret_is_never_stored_in_clear",
            "test_the_nonce_store_failing_refuses_the_request",
        },
    )
)


@pytest.fixture
def storage(pg_storage: SqlStorage) -> SqlStorage:
    return pg_storage


def test_secret_is_never_stored_in_clear(
    app: Any, api: Api, svc: Any, pg_database: PgDatabase
) -> None:
    akid, secret = base.issue(api)
    dump = pg_database.cluster.dump(pg_database.name)
    assert akid.encode() in dump and secret.encode() not in dump
    assert all(secret not in str(r) for r in api.audit())


def test_the_nonce_store_failing_refuses_the_request(
    app: Any, api: Api, svc: Any, pg_database: PgDatabase
) -> None:
    akid, secret = base.issue(api)
    pg_database.refuse_inserts("sigv4_nonces")
    with pytest.raises(StorageUnavailable):
        base.verify(app, base.sign(akid, secret))
    pg_database.accept_inserts("sigv4_nonces")
    assert base.verify(app, base.sign(akid, secret))


def test_the_tests_of_this_module_run_on_postgresql(
    api: Api, svc: Any, pg_database: PgDatabase
) -> None:
    akid, _ = base.issue(api)
    assert pg_database.execute("SELECT access_key_id FROM sigv4_credentials") == [(akid,)]
