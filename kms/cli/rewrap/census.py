"""``kms rewrap census PATH``: count the blobs of a JSONL file or a directory per key and
version, without a server (to see what is left before retiring old versions)."""

from __future__ import annotations

from pathlib import Path

import click

from kms.cli.common import print_json
from kms.client.rewrap import census_jsonl
from kms.client.rewrap_files import census_files, list_files


@click.command("census")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--field", default="ciphertext", show_default=True, help="JSONL member with blob.")
@click.option("--pattern", default="*", show_default=True, help="Files to count (directory).")
@click.option("--context-suffix", help="Sidecar context files to leave out (directory).")
def census(path: Path, field: str, pattern: str, context_suffix: str | None) -> None:
    """Count the blobs of a JSONL file or a directory per key and version (local only).

    Prints {blobs, unreadable, keys: {key_id: {version: count}}, problems}.
    """
    try:
        if path.is_dir():
            result = census_files(path, list_files(path, pattern, context_suffix))
        else:
            with path.open("rb") as lines:
                result = census_jsonl(lines, field)
    except OSError as e:
        raise click.ClickException(str(e)) from None
    print_json(result.to_json())
