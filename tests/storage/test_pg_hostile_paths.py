"""tests/functional/test_hostile_paths.py again, on PostgreSQL (where a NUL reaching the
driver is refused by it)."""

from __future__ import annotations

import pytest

from kms.backends.storage import SqlStorage
from tests.functional import test_hostile_paths as base
from tests.pg import rerun

globals().update(rerun(base, skip=set()))


@pytest.fixture
def storage(pg_storage: SqlStorage) -> SqlStorage:
    return pg_storage
