"""``kms rewrap dir DIR``: rewrap, in place, every file under DIR.

Files are taken recursively, sorted by path; hidden files, symlinks and context sidecars
are skipped. Raw blob files and envelope files made by the SDK are both handled (envelopes
are re-sealed, see kms.client.rewrap_files; that needs the rewrap and decrypt grants). The
context is ``--context JSON`` for every file, or with ``--context-suffix S`` it is read
from the JSON file ``FILE+S`` next to each file. The state file (run.py) records the last
file done in sorted order.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from kms.cli.rewrap.run import Refused, Run, bulk_rewrapper, progress, run_options, stoppable
from kms.client.rewrap import BulkRewrapper, InputError, chunks
from kms.client.rewrap_files import list_files, rewrap_files
from kms.formats import context as ctx


@click.command("dir")
@click.argument(
    "directory", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option("--pattern", default="*", show_default=True, help="Glob of the files to rewrap.")
@click.option("--context", "context_json", default="{}", help="Context (JSON) of every file.")
@click.option("--context-suffix", help="Read each file's context from the JSON file FILE+SUFFIX.")
@run_options
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
    run = Run.load(state_path, run_id)
    if run is None or not run.state["complete"]:
        bulk = bulk_rewrapper(url, token_file, batch_size, reference)
        run = run or Run.start(state_path, run_id, {"cursor": None})
        names = list_files(directory, pattern, context_suffix)
        cursor = run.position["cursor"]
        todo = [n for n in names if cursor is None or n > cursor]
        chosen = todo if max_items is None else todo[:max_items]
        with stoppable(run), progress(len(names), len(names) - len(todo)) as bar:
            for chunk in chunks(chosen, batch_size):
                _dir_chunk(run, bulk, directory, chunk, fixed, context_suffix)
                run.commit({"cursor": chunk[-1]})
                bar.update(len(chunk))
        if len(chosen) < len(todo):
            run.report(f"stopped after --max-items {max_items}")
        run.commit(run.position, complete=True)
    run.report()


def _dir_chunk(
    run: Run,
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
