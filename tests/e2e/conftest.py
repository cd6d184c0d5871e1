"""Real gunicorn servers on free loopback ports, each with its own data directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, gunicorn_server, init_data_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = init_data_dir(tmp_path_factory.mktemp("e2e-data"))
    with gunicorn_server(data, workers=2) as srv:
        yield srv


@pytest.fixture
def fresh_data_dir(tmp_path: Path) -> Path:
    return init_data_dir(tmp_path / "data")
