"""``kms rewrap``: move stored blobs to the current version of their key, resumably.

- ``kms rewrap jsonl IN OUT`` (jsonl.py): the blobs of a JSON Lines file, into a copy.
- ``kms rewrap dir DIR`` (files.py): raw blob files and SDK envelope files, in place.
- ``kms rewrap census PATH`` (census.py): count blobs per key and version, locally.

``jsonl`` and ``dir`` are resumable runs (run.py): progress is committed to a state file,
and running the same command again continues from there.

Exit status: 0 complete; 1 complete with failed items; 2 unusable arguments or state;
3 not finished (``--max-items`` reached, server or connection error, Ctrl-C): run the same
command again to continue. The summary (JSON on stdout) counts items per outcome and the
blobs of the output per key and version.
"""

from __future__ import annotations

import click

from kms.cli.rewrap.census import census
from kms.cli.rewrap.files import rewrap_dir
from kms.cli.rewrap.jsonl import rewrap_jsonl

__all__ = ["rewrap"]


@click.group("rewrap")
def rewrap() -> None:
    """Rewrap stored blobs under the current key versions (resumable), and count them.

    Needs a service token with the rewrap grant (and decrypt for envelope files).
    Exit status: 0 complete, 1 complete with failed items, 2 bad arguments or state,
    3 not finished (run the same command again to continue).
    """


for _command in (rewrap_jsonl, rewrap_dir, census):
    rewrap.add_command(_command)
