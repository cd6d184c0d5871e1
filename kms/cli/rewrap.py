"""``kms rewrap``: move stored blobs to the current version of their key, resumably.

``kms rewrap jsonl IN OUT`` reads JSON Lines: each line a JSON object whose member
``--field`` (default ``ciphertext``) holds a blob as standard base64 and whose member
``--context-field`` (default ``context``) holds its encryption context, an object of
strings (absent or null: ``{}``). Example::

    {"id": 17, "ciphertext": "S01TVwEk...", "context": {"patient": "p-17"}, "note": "x"}

OUT gets the same lines in the same order; in a rewrapped line only the text of the blob
value changes, every other byte is kept. Blank lines are copied. A line that cannot be
used (not UTF-8 or JSON, not an object, field missing or not base64, bad context) or that
the server refuses (``decryption_failed``, ``forbidden``, ``key_version_retired``...) is a
*failed item*: copied unchanged, named by its line number in the summary; the run goes on
and exits 1. IN is only read. OUT is written as ``OUT.partial`` and renamed to OUT when
complete.

``kms rewrap dir DIR`` rewraps, in place, every file under DIR (recursively, sorted by
path; hidden files, symlinks and context sidecars skipped): raw blob files and envelope
files made by the SDK (re-sealed, see kms.client.rewrap; needs the rewrap and decrypt
grants). The context is ``--context JSON`` for every file, or with ``--context-suffix S``
read from the JSON file ``FILE+S`` next to each file.

Resume: progress is committed to a state file (atomically, after each batch's output is
fsynced): for JSONL the input offset, line count and committed length of OUT.partial; for
a directory the last file done in sorted order. Running the same command again continues
from there; output past the committed length is discarded and redone, so no line is lost
or duplicated. After a hard kill at most the one batch in flight is rewrapped a second time
on the server (harmless: the newer result is kept). A finished run's state is kept; to start
a new pass, remove it.

Exit status: 0 complete; 1 complete with failed items; 2 unusable arguments or state;
3 not finished (``--max-items`` reached, server or connection error, Ctrl-C): run the same
command again to continue. The summary (JSON on stdout) counts items per outcome and the
blobs of the output per key and version.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click

from kms.cli.common import client, print_json, remote
from kms.client.http import KmsClientError
from kms.client.rewrap import (
    BATCH_SIZE,
    MAX_BATCH,
    BulkRewrapper,
    Census,
    InputError,
    JsonlRecord,
    RewrapResult,
    census_jsonl,
    chunks,
    parse_jsonl_line,
    write_atomically,
)
from kms.client.rewrap_files import census_files, list_files, rewrap_files
from kms.formats import context as ctx

STATE_FORMAT = "kms-rewrap-state/1"
MAX_FAILURES = 1000  # failures kept in the state file (all are counted)
SHOWN_FAILURES = 20
EXIT_FAILED_ITEMS = 1
EXIT_UNFINISHED = 3


class Refused(click.ClickException):
    exit_code = 2


class _Run:
    """The state of one resumable run, saved atomically to ``path``."""

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path = path
        self.state = state
        self.census = Census.from_json(state["census"])

    @classmethod
    def load(cls, path: Path, run: dict[str, Any]) -> _Run | None:
        """The saved run at ``path`` (None if there is none); Refused if it is not a state
        file of this same run."""
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise Refused(f"{path}: unreadable state file ({e})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise Refused(f"{path} is not a kms rewrap state file")
        if state.get("run") != run:
            raise Refused(
                f"{path} belongs to another run (different input, output or options, or "
                "the input changed); remove it (and any partial output) to start over"
            )
        return cls(path, state)

    @classmethod
    def start(cls, path: Path, run: dict[str, Any], position: dict[str, Any]) -> _Run:
        state = {
            "format": STATE_FORMAT,
            "run": run,
            "complete": False,
            "position": position,
            "counts": {"rewrapped": 0, "current": 0, "failed": 0},
            "census": Census().to_json(),
            "failures": [],
        }
        started = cls(path, state)
        started.save()
        return started

    @property
    def position(self) -> dict[str, Any]:
        return dict(self.state["position"])

    def record(self, where: str, result: RewrapResult | None, problem: str = "") -> None:
        """Count one item: a result from the SDK, or an input problem found locally."""
        status = result.status if result else "failed"
        self.state["counts"][status] += 1
        if result is None or result.status == "failed":
            code, message = "invalid_input", problem
            if result is not None and result.error is not None:
                code, message = result.error.code, result.error.message
            if len(self.state["failures"]) < MAX_FAILURES:
                self.state["failures"].append({"at": where, "code": code, "message": message})
            problem = message
        if result is None:
            self.census.count(None, None, where, problem)
        else:
            self.census.count(result.key_id, result.key_version, where)

    def commit(self, position: dict[str, Any], complete: bool = False) -> None:
        self.state["position"] = position
        self.state["complete"] = complete
        self.save()

    def save(self) -> None:
        self.state["census"] = self.census.to_json()
        write_atomically(self.path, json.dumps(self.state, indent=1, sort_keys=True).encode())

    def report(self, unfinished: str | None = None) -> None:
        """Print the summary (stdout) and the failures (stderr); exit 0, 1 or 3."""
        counts, census = self.state["counts"], self.census.to_json()
        print_json(
            {
                "complete": self.state["complete"],
                **counts,
                "keys": census["keys"],
                "unreadable": census["unreadable"],
                "failures": self.state["failures"],
            }
        )
        for failure in self.state["failures"][:SHOWN_FAILURES]:
            click.echo(f"{failure['at']}: {failure['code']}: {failure['message']}", err=True)
        if counts["failed"] > SHOWN_FAILURES:
            click.echo(f"... {counts['failed'] - SHOWN_FAILURES} more failed items", err=True)
        done = f"{counts['rewrapped']} rewrapped, {counts['current']} already current, "
        done += f"{counts['failed']} failed"
        if unfinished:
            click.echo(f"{unfinished}; {done} so far; progress saved in {self.path}:", err=True)
            click.echo("run the same command again to continue", err=True)
            sys.exit(EXIT_UNFINISHED)
        click.echo(f"complete: {done}", err=True)
        sys.exit(EXIT_FAILED_ITEMS if counts["failed"] else 0)


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in (
        click.option(
            "--batch-size", default=BATCH_SIZE, show_default=True, type=click.IntRange(1, MAX_BATCH)
        ),
        click.option(
            "--state",
            "state_path",
            type=click.Path(dir_okay=False, path_type=Path),
            help="State file for resuming (default: OUT.rewrap-state.json for jsonl, "
            "DIR/.kms-rewrap-state.json for dir).",
        ),
        click.option(
            "--max-items",
            type=click.IntRange(1),
            help="Stop after this many items (exit 3); the next run continues.",
        ),
        click.option(
            "--reference",
            default="kms rewrap",
            show_default=True,
            help="Free text recorded with each operation in the audit trail.",
        ),
    ):
        fn = option(fn)
    return remote(fn)


@click.group("rewrap")
def rewrap() -> None:
    """Rewrap stored blobs under the current key versions (resumable), and count them.

    Needs a service token with the rewrap grant (and decrypt for envelope files).
    Exit status: 0 complete, 1 complete with failed items, 2 bad arguments or state,
    3 not finished (run the same command again to continue).
    """


@contextmanager
def _stoppable(run: _Run) -> Iterator[None]:
    """A server, connection or local I/O error, or Ctrl-C, ends the run as unfinished;
    the state keeps the last committed batch."""
    try:
        yield
    except (KmsClientError, OSError) as e:
        run.report(f"stopped: {e}")
    except KeyboardInterrupt:
        run.report("interrupted")


@rewrap.command("jsonl")
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
@_common
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
    run = _Run.load(state_path, run_id)
    if run is None or not run.state["complete"]:
        bulk = _bulk(url, token_file, batch_size, reference)
        if run is None:
            if output.exists() or partial.exists():
                raise Refused(f"{output} or {partial} already exists (and no state file)")
            start = {"input_offset": 0, "lines": 0, "output_bytes": 0}
            run = _Run.start(state_path, run_id, start)
        with _stoppable(run), _open_partial(partial, run) as out:
            options = (batch_size, field, context_field, max_items)
            if not _jsonl_pass(run, bulk, input_path, out, options):
                run.report(f"stopped after --max-items {max_items}")
    if partial.exists():
        os.replace(partial, output)
        _fsync_dir(output)
    run.report()


def _jsonl_pass(
    run: _Run,
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
    with input_path.open("rb") as src, _progress(size, pos["input_offset"]) as bar:
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
    run: _Run, bulk: BulkRewrapper, lines: list[bytes], before: int, field: str, cfield: str
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


@rewrap.command("dir")
@click.argument(
    "directory", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option("--pattern", default="*", show_default=True, help="Glob of the files to rewrap.")
@click.option("--context", "context_json", default="{}", help="Context (JSON) of every file.")
@click.option("--context-suffix", help="Read each file's context from the JSON file FILE+SUFFIX.")
@_common
def rewrap_dir(
    directory: Path,
    pattern: str,
    context_json: str,
    context_suffix: str | None,
    batch_size: int,
    state_path: Path | None,
    max_items: int | None,
    reference: str,
    url: str,
    token_file: Path | None,
) -> None:
    """Rewrap, in place, the raw blob files and envelope files under DIR.

    Each file is replaced atomically only once its new content is complete; a file that
    cannot be rewrapped is left untouched and reported (exit 1). The state file defaults
    to DIR/.kms-rewrap-state.json.
    """
    try:
        fixed = ctx.validate(json.loads(context_json))
    except (ValueError, ctx.ContextError) as e:
        raise Refused(f"--context: {e}") from None
    state_path = state_path or directory / ".kms-rewrap-state.json"
    run_id = {
        "mode": "dir",
        "root": str(directory.resolve()),
        "pattern": pattern,
        "context_sha256": ctx.digest(fixed),
        "context_suffix": context_suffix,
    }
    run = _Run.load(state_path, run_id)
    if run is None or not run.state["complete"]:
        bulk = _bulk(url, token_file, batch_size, reference)
        run = run or _Run.start(state_path, run_id, {"cursor": None})
        names = list_files(directory, pattern, context_suffix)
        cursor = run.position["cursor"]
        todo = [n for n in names if cursor is None or n > cursor]
        chosen = todo if max_items is None else todo[:max_items]
        with _stoppable(run), _progress(len(names), len(names) - len(todo)) as bar:
            for chunk in chunks(chosen, batch_size):
                _dir_chunk(run, bulk, directory, chunk, fixed, context_suffix)
                run.commit({"cursor": chunk[-1]})
                bar.update(len(chunk))
        if len(chosen) < len(todo):
            run.report(f"stopped after --max-items {max_items}")
        run.commit(run.position, complete=True)
    run.report()


def _dir_chunk(
    run: _Run,
    bulk: BulkRewrapper,
    root: Path,
    names: list[str],
    fixed: dict[str, str],
    suffix: str | None,
) -> None:
    files: list[tuple[Path, dict[str, str]]] = []
    problems: dict[str, str] = {}
    for name in names:
        try:
            context = fixed if suffix is None else _sidecar(root / (name + suffix))
        except InputError as e:
            problems[name] = str(e)
        else:
            files.append((root / name, context))
    results = dict(zip([p for p, _ in files], rewrap_files(bulk, files), strict=True))
    for name in names:
        if name in problems:
            run.record(name, None, problems[name])
        else:
            run.record(name, results[root / name])


def _sidecar(path: Path) -> dict[str, str]:
    try:
        return ctx.validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise InputError(f"no context file {path.name}") from None
    except (OSError, ValueError, ctx.ContextError) as e:
        raise InputError(f"context file {path.name}: {e}") from None


@rewrap.command("census")
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


# -- helpers ----------------------------------------------------------------------------------


def _bulk(url: str, token_file: Path | None, batch_size: int, reference: str) -> BulkRewrapper:
    try:
        return BulkRewrapper(client(url, token_file), batch_size=batch_size, reference=reference)
    except (KmsClientError, OSError) as e:
        raise Refused(str(e)) from None


def _fingerprint(path: Path) -> tuple[int, str]:
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
def _open_partial(partial: Path, run: _Run) -> Iterator[IO[bytes]]:
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


@contextmanager
def _progress(length: int, done: int) -> Iterator[Any]:
    with click.progressbar(length=length, label="rewrapping", file=sys.stderr) as bar:
        bar.update(done)
        yield bar


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
