"""``kms changes``: dual control of the control plane (docs/dual-control.md). Admins list,
apply and cancel changes and propose a control policy; custodians review a change,
recomputed here from its fields, and sign their approval or rejection offline."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from kms.cli.common import clear_errors, client, print_json, printable, private_key, remote
from kms.client import KmsClientError, change_signature

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
STATES = ("pending", "applied", "rejected", "cancelled")
MODES = ("dual", "single-operator")


def _check_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not UUID_RE.fullmatch(value):
        raise click.BadParameter(f"{value!r}: a change id is a UUID (lowercase hex and dashes)")
    return value


_change_id = click.argument("change_id", callback=_check_id)
_key = click.option(
    "--key",
    "key_file",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Your custodian private key (from `kms escrow keygen`).",
)
_custodian = click.option("--custodian", required=True, help="Your custodian name.")
_yes = click.option("--yes", is_flag=True, help="Sign without asking (after reviewing it).")


@click.group()
def changes() -> None:
    """Dual control: review, approve, reject, apply and cancel control-plane changes;
    show and propose the control policy."""


@changes.command("list")
@click.option("--state", type=click.Choice(STATES), help="Only changes in this state.")
@remote
def list_changes(state: str | None, url: str, token_file: Path | None) -> None:
    """List changes, newest first (a pending one past its expiry shows "expired")."""
    with clear_errors():
        print_json(client(url, token_file).list_changes(state))


@changes.command("show")
@_change_id
@remote
def show(change_id: str, url: str, token_file: Path | None) -> None:
    """Show a change: what it does, its digest, state and approvals."""
    with clear_errors():
        print_json(client(url, token_file).change(change_id))


@changes.command("approve")
@_change_id
@_key
@_custodian
@_yes
@remote
def approve(
    change_id: str, key_file: Path, custodian: str, yes: bool, url: str, token_file: Path | None
) -> None:
    """Recompute the change's digest here, show the change, sign your approval with your
    key and submit it."""
    _decide(change_id, key_file, custodian, "approve", yes, url, token_file)


@changes.command("reject")
@_change_id
@_key
@_custodian
@_yes
@remote
def reject(
    change_id: str, key_file: Path, custodian: str, yes: bool, url: str, token_file: Path | None
) -> None:
    """Sign a rejection (it rejects the change if your group is one it needs)."""
    _decide(change_id, key_file, custodian, "reject", yes, url, token_file)


@changes.command("apply")
@_change_id
@remote
def apply(change_id: str, url: str, token_file: Path | None) -> None:
    """Apply an approved change (its proposer): prints what the original command would
    have (a new principal's token, shown once)."""
    with clear_errors():
        print_json(client(url, token_file).apply_change(change_id))


@changes.command("cancel")
@_change_id
@remote
def cancel(change_id: str, url: str, token_file: Path | None) -> None:
    """Withdraw a pending change (an admin)."""
    with clear_errors():
        print_json(client(url, token_file).cancel_change(change_id))


@changes.command("policy")
@remote
def policy(url: str, token_file: Path | None) -> None:
    """Show the control policy in force."""
    with clear_errors():
        print_json(client(url, token_file).control_policy())


@changes.command("set-policy")
@click.option("--mode", type=click.Choice(MODES))
@click.option("--quorum", type=click.IntRange(1, 16), help="Approvals a change needs.")
@click.option(
    "--required-group",
    "required_groups",
    multiple=True,
    help="A group with a member among the approvers of every change (repeat).",
)
@click.option("--no-required-groups", is_flag=True, help="Require no particular group.")
@click.option(
    "--ttl-seconds",
    type=click.IntRange(300, 30 * 86400),
    help="How long a proposed change may wait for approvals.",
)
@remote
def set_policy(
    mode: str | None,
    quorum: int | None,
    required_groups: tuple[str, ...],
    no_required_groups: bool,
    ttl_seconds: int | None,
    url: str,
    token_file: Path | None,
) -> None:
    """Propose a new control policy (an admin; itself a change under dual control).
    Settings not given keep their current value."""
    if required_groups and no_required_groups:
        raise click.UsageError("give --required-group or --no-required-groups, not both")
    if not (mode or quorum or required_groups or no_required_groups or ttl_seconds):
        raise click.UsageError("nothing to change")
    with clear_errors():
        api = client(url, token_file)
        now = api.control_policy()
        groups = [] if no_required_groups else list(required_groups or now["required_groups"])
        print_json(
            api.set_control_policy(
                mode or now["mode"],
                quorum or now["quorum"],
                groups,
                ttl_seconds or now["ttl_seconds"],
            )
        )


def _decide(
    change_id: str,
    key_file: Path,
    custodian: str,
    decision: str,
    yes: bool,
    url: str,
    token_file: Path | None,
) -> None:
    key = private_key(key_file)
    with clear_errors():
        api = client(url, token_file)
        change = api.change(change_id)
        # Sign the digest recomputed from the fields shown, never the server's as given.
        signature = change_signature(change, key, decision)
        click.echo(describe(change), err=True)
        if change.get("state") != "pending":
            raise click.ClickException(f"the change is {printable(str(change.get('state')))}")
        if not yes and not _confirm(decision):
            raise click.ClickException("not signed")
        if decision == "approve":
            print_json(api.approve_change(change_id, custodian, signature))
        else:
            print_json(api.reject_change(change_id, custodian, signature))


def _confirm(decision: str) -> bool:
    noun = "approval" if decision == "approve" else "rejection"
    try:
        return click.confirm(f"Sign your {noun} of this change?", err=True)
    except click.Abort:  # no answer (end of input)
        return False


def describe(change: dict[str, Any]) -> str:
    """The change as a custodian reviews it before signing (printable text only)."""

    def text(value: Any) -> str:
        return printable(value if isinstance(value, str) else json.dumps(value, sort_keys=True))

    def names(field: str) -> str:
        return text(", ".join(map(str, change.get(field) or [])) or "-")

    params = change.get("params")
    if not isinstance(params, dict):
        raise KmsClientError("bad_response", "the change's params are not an object")
    width = max((len(text(k)) for k in params), default=0)
    lines = [
        f"Change {text(change['change_id'])}: {text(change['kind'])}, "
        f"proposed by {text(change['proposer'])}",
        *(f"  {text(k):<{width}}  {text(v)}" for k, v in sorted(params.items())),
        f"  created {text(change['created_at'])}, expires {text(change['expires_at'])}",
        f"  state {text(change.get('state'))}; approvals: {names('approvals')}; "
        f"needs a member of each of: {names('required_groups')}",
        f"  digest {text(change['digest'])} (recomputed here: it matches)",
    ]
    return "\n".join(lines)
