"""Pieces shared by the ``kms`` commands: error handling, output, remote options."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from kms.client import KmsClient, KmsClientError

DEFAULT_URL = "http://127.0.0.1:8200"


@contextmanager
def clear_errors() -> Iterator[None]:
    """Turn every expected failure into one line on stderr and exit status 1."""
    from kms.config import ConfigError
    from kms.errors import KmsError

    try:
        yield
    except click.ClickException:
        raise
    except KmsClientError as e:
        raise click.ClickException(str(e)) from None
    except (ConfigError, OSError) as e:
        raise click.ClickException(str(e)) from None
    except KmsError as e:
        raise click.ClickException(f"{e.code}: {e.message}") from None
    except Exception as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from None


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="KMS_DATA_DIR",
    required=True,
    help="Data directory (env KMS_DATA_DIR).",
)


def client(url: str, token_file: Path | None) -> KmsClient:
    token = os.environ.get("KMS_TOKEN")
    if token_file is not None:
        token = token_file.read_text().strip()
    if not token:
        raise click.UsageError("give --token-file or set KMS_TOKEN / KMS_TOKEN_FILE")
    return KmsClient(url, token)


def remote(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--url", envvar="KMS_URL", default=DEFAULT_URL, show_default=True)(fn)
    return click.option(
        "--token-file",
        envvar="KMS_TOKEN_FILE",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="File holding a bearer token (env KMS_TOKEN_FILE, or KMS_TOKEN).",
    )(fn)
