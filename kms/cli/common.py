"""Pieces shared by the ``kms`` commands: error handling, output, remote options."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms.client import KmsClient, KmsClientError, pending_change

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
        # The operator runs these commands on the server: the precise, non-secret reason
        # (the audit log's) is theirs to read.
        detail = f" ({e.detail})" if e.detail else ""
        raise click.ClickException(f"{e.code}: {e.message}{detail}") from None
    except Exception as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from None


def print_json(data: Any) -> None:
    """The answer as JSON on stdout. A pending change (a gated request under dual control,
    answered 202) is also told on stderr, with the next steps."""
    click.echo(json.dumps(data, indent=2, sort_keys=True))
    change = pending_change(data)
    if change is not None:
        cid = printable(str(change.get("change_id")))
        kind = printable(str(change.get("kind")))
        click.echo(
            f"change {cid} proposed ({kind}): it needs approvals (dual control); nothing "
            "is done yet.\n"
            f"next: custodians run  kms changes approve {cid} --key FILE --custodian NAME\n"
            f"      then you run    kms changes apply {cid}",
            err=True,
        )


def printable(text: str) -> str:
    """Text from the server, shown to a human about to sign: no terminal controls."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def private_key(key_file: Path) -> Ed25519PrivateKey:
    """A custodian's Ed25519 private key (PEM, from ``kms escrow keygen``); one clear
    error if the file cannot be read or holds another kind of key."""
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as e:
        raise click.ClickException(f"cannot read the custodian key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise click.ClickException("the custodian key is not an Ed25519 private key")
    return key


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
