"""``kms rewrap jsonl IN OUT``: rewrap the blobs of a JSON Lines file into a copy.

IN is read as JSON Lines: each line a JSON object whose member ``--field`` (default
``ciphertext``) holds a blob as standard base64 and whose member ``--context-field``
(default ``context``) holds its encryption context, an object of strings (absent or null:
``{}``). Example::

    {"id": 17, "ciphertext": "S01TVwEk...", "context": {"patient": "p-17"}, "note": "x"}

OUT gets the same lines in the same order; in a rewrapped line only the text of the blob
value changes, every other byte is kept. Blank lines are copied. A line that cannot be
used (not UTF-8 or JSON, not an object, field missing or not base64, bad context) or that
the server refuses (``decryption_failed``, ``forbidden``, ``key_version_retired``...) is a
*failed item*: copied unchanged, named by its line number in the summary; the run goes on
and exits 1. IN is only read. OUT is written as ``OUT.partial`` and renamed to OUT when
complete; the state file (run.py) records how much of OUT.partial is committed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import click

from kms.cli.rewrap.run import Refused, Run, bulk_rewrapper, progress, run_options, stoppable
from kms.client.rewrap import BulkRewrapper, InputError, JsonlRecord, parse_jsonl_line


@click.command("jsonl")
@click.argument(
    "input_path", metavar="IN", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.argument("output", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--field", default="ciphertext", show_default=True, help="Member with the blob.")
@click.option(
    "--context-field",
    default="context",
    show_default=True,
    help="Member with the context object (absent or null: {}); '' for no context.",
)
@run_options
def rewrap_jsonl(
    input_path: Path,
    output: Path,
    field: str,
    context_field: str,
    batch_size: int,
    state_path: Path | None,
    max_items: int | None,
    reference: str,
    url: str,
    token_file: Path | None,
) -> None:
    """Rewrap the blobs of a JSON Lines file IN into OUT (same lines, same order).

    Each line: a JSON object with the base64 blob under --field and its encryption context
    object under --context-field, e.g.

    \b
      {"id": 7, "ciphertext": "S01TVwEk...", "context": {"patient": "p-7"}}

    Only the blob's value changes; every other byte of a line is kept. A bad line or an
    item the server refuses is copied unchanged and reported by line number (exit 1). IN
    is never modified; OUT appears when the run completes (OUT.partial until then). Run
    the same command again after an interruption (exit 3) to continue where it stopped.
    """
    partial = output.with_name(output.name + ".partial")
    state_path = state_path or output.with_name(output.name + ".rewrap-state.json")
    source = input_path.resolve()
    if len({p.resolve() for p in (input_path, output, partial, state_path)}) < 4:
        raise Refused("IN, OUT, OUT.partial and the state file must be four different files")
    size, digest = _fingerprint(input_path)
    run_id = {
        "mode": "jsonl",
        "input": str(source),
        "input_size": size,
        "input_sha256": digest,
        "output": str(output.resolve()),
        "field": field,
        "context_field": context_field,
    }
    run = Run.load(state_path, run_id)
    if run is None or not run.state["complete"]:
        bulk = bulk_rewrapper(url, token_file, batch_size, reference)
        if run is None:
            if output.exists() or partial.exists():
                raise Refused(f"{output} or {partial} already exists (and no state file)")
            start = {"input_offset": 0, "lines": 0, "output_bytes": 0}
            run = Run.start(state_path, run_id, start)
        with stoppable(run), _open_partial(partial, run) as out:
            options = (batch_size, field, context_field, max_items)
            if not _jsonl_pass(run, bulk, input_path, out, options):
                run.report(f"stopped after --max-items {max_items}")
    if partial.exists():
        os.replace(partial, output)
        _fsync_dir(output)
    run.report()


def _jsonl_pass(
    run: Run,
    bulk: BulkRewrapper,
    input_path: Path,
    out: IO[bytes],
    options: tuple[int, str, str, int | None],
) -> bool:
    """Process from the committed position to the end (True: complete) or until
    ``max_items`` items were done (False)."""
    batch_size, field, context_field, left = options
    pos = run.position
    size = input_path.stat().st_size
    with input_path.open("rb") as src, progress(size, pos["input_offset"]) as bar:
        src.seek(pos["input_offset"])
        while True:
            if left == 0:
                if src.read(1):
                    return False
                break
            lines = _read_lines(src, batch_size if left is None else min(batch_size, left))
            if not lines:
                break
            data, items = _jsonl_chunk(run, bulk, lines, pos["lines"], field, context_field)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
            consumed = sum(len(line) for line in lines)
            pos = {
                "input_offset": pos["input_offset"] + consumed,
                "lines": pos["lines"] + len(lines),
                "output_bytes": pos["output_bytes"] + len(data),
            }
            run.commit(pos)
            bar.update(consumed)
            left = None if left is None else left - items
    run.commit(pos, complete=True)
    return True


def _read_lines(src: IO[bytes], items: int) -> list[bytes]:
    """Lines holding up to ``items`` non-blank lines (blank lines ride along)."""
    lines: list[bytes] = []
    while items > 0:
        line = src.readline()
        if not line:
            break
        lines.append(line)
        items -= bool(line.strip())
    return lines


def _jsonl_chunk(
    run: Run, bulk: BulkRewrapper, lines: list[bytes], before: int, field: str, cfield: str
) -> tuple[bytes, int]:
    """The output bytes of ``lines`` (numbered from ``before + 1``) and their item count;
    a line stays as it was unless its blob was rewrapped."""
    out = [line.rstrip(b"\n") + b"\n" for line in lines]
    items = [k for k, line in enumerate(out) if line.strip()]
    problems: dict[int, str] = {}
    parsed: dict[int, JsonlRecord] = {}
    for k in items:
        try:
            parsed[k] = parse_jsonl_line(out[k][:-1], field, cfield or None)
        except InputError as e:
            problems[k] = str(e)
    results = dict(zip(parsed, bulk.rewrap([r.item for r in parsed.values()]), strict=True))
    for k in items:
        where = f"line {before + k + 1}"
        if k in problems:
            run.record(where, None, problems[k])
            continue
        run.record(where, results[k])
        if results[k].ciphertext is not None:
            out[k] = parsed[k].with_ciphertext(results[k].ciphertext or b"").encode() + b"\n"
    return b"".join(out), len(items)


def _fingerprint(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of IN: they identify the run, so a changed input cannot resume
    from another input's state file."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
                size += len(block)
    except OSError as e:
        raise Refused(str(e)) from None
    return size, digest.hexdigest()


@contextmanager
def _open_partial(partial: Path, run: Run) -> Iterator[IO[bytes]]:
    """OUT.partial cut back to its committed length (created, 0600, if nothing is)."""
    committed = run.position["output_bytes"]
    if not partial.exists() and committed == 0:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        f = partial.open("r+b")
    except FileNotFoundError:
        raise Refused(f"{partial} is missing; remove {run.path} to start over") from None
    with f:
        if os.fstat(f.fileno()).st_size < committed:
            raise Refused(f"{partial} is shorter than {run.path} records; remove both")
        f.truncate(committed)
        f.seek(committed)
        yield f


def _fsync_dir(path: Path) -> None:
    """Make the rename of OUT.partial to OUT durable."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
