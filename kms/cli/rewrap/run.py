"""One resumable rewrap run, as ``kms rewrap jsonl`` and ``kms rewrap dir`` share it: the
options it takes, its state file, and how it ends (summary and exit status).

Resume: progress is committed to a state file (atomically, after each batch's output is
fsynced): for JSONL the input offset, line count and committed length of OUT.partial; for
a directory the last file done in sorted order. Running the same command again continues
from there; output past the committed length is discarded and redone, so no line is lost
or duplicated. After a hard kill at most the one batch in flight is rewrapped a second time
on the server (harmless: the newer result is kept). A finished run's state is kept; to start
a new pass, remove it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from kms.cli.common import client, print_json, remote
from kms.client.http import KmsClientError
from kms.client.rewrap import (
    BATCH_SIZE,
    MAX_BATCH,
    BulkRewrapper,
    Census,
    RewrapResult,
    write_atomically,
)

STATE_FORMAT = "kms-rewrap-state/1"
MAX_FAILURES = 1000  # failures kept in the state file (all are counted)
SHOWN_FAILURES = 20
EXIT_FAILED_ITEMS = 1
EXIT_UNFINISHED = 3


class Refused(click.ClickException):
    """Unusable arguments or state file: one line on stderr, exit status 2."""

    exit_code = 2


class Run:
    """The state of one resumable run, saved atomically to ``path``."""

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path = path
        self.state = state
        self.census = Census.from_json(state["census"])

    @classmethod
    def load(cls, path: Path, run: dict[str, Any]) -> Run | None:
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
    def start(cls, path: Path, run: dict[str, Any], position: dict[str, Any]) -> Run:
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


def run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of every resumable run, and those naming the server and token."""
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


@contextmanager
def stoppable(run: Run) -> Iterator[None]:
    """A server, connection or local I/O error, or Ctrl-C, ends the run as unfinished;
    the state keeps the last committed batch."""
    try:
        yield
    except (KmsClientError, OSError) as e:
        run.report(f"stopped: {e}")
    except KeyboardInterrupt:
        run.report("interrupted")


def bulk_rewrapper(
    url: str, token_file: Path | None, batch_size: int, reference: str
) -> BulkRewrapper:
    """The SDK's bulk rewrapper for these options; a bad token file is Refused."""
    try:
        return BulkRewrapper(client(url, token_file), batch_size=batch_size, reference=reference)
    except (KmsClientError, OSError) as e:
        raise Refused(str(e)) from None


@contextmanager
def progress(length: int, done: int) -> Iterator[Any]:
    """A progress bar on stderr, already advanced by ``done`` of ``length``."""
    with click.progressbar(length=length, label="rewrapping", file=sys.stderr) as bar:
        bar.update(done)
        yield bar
