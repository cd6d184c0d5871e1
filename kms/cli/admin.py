"""Administration commands that talk to a running server as an admin: ``principals``,
``keys`` and ``grants``. Each prints the server's JSON answer."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import click

from kms.cli.common import clear_errors, client, print_json, remote
from kms.services.principals import NAME_RE
from kms.services.tokens import MAX_GRACE_SECONDS, MAX_TTL_SECONDS, TOKEN_ID_RE


@click.group()
def principals() -> None:
    """Create, list, disable and enable principals; list, issue, rotate and revoke their
    bearer tokens; end their dashboard sessions."""


@principals.command("create")
@click.argument("name")
@click.option(
    "--role",
    required=True,
    type=click.Choice(["admin", "service", "auditor", "custodian", "requester"]),
)
@remote
def principals_create(name: str, role: str, url: str, token_file: Path | None) -> None:
    """Create a principal and print its token (shown once)."""
    with clear_errors():
        print_json(client(url, token_file).create_principal(name, role))


@principals.command("list")
@remote
def principals_list(url: str, token_file: Path | None) -> None:
    """List principals."""
    with clear_errors():
        print_json(client(url, token_file).list_principals())


def _checked(
    pattern: re.Pattern[str], what: str
) -> Callable[[click.Context, click.Parameter, str], str]:
    """A click callback refusing a value ``pattern`` does not match (before any request:
    a '/' would otherwise reach the server as another path)."""

    def check(ctx: click.Context, param: click.Parameter, value: str) -> str:
        if not pattern.fullmatch(value):
            raise click.BadParameter(f"{value!r}: {what}")
        return value

    return check


_name = click.argument(
    "name",
    callback=_checked(
        NAME_RE,
        "a principal name is 1-64 letters, digits, '.', '_', '@' or '-', "
        "starting with a letter or digit",
    ),
)
_token_id = click.argument(
    "token_id", callback=_checked(TOKEN_ID_RE, "a token id is 16 lowercase hex digits")
)
_ttl = click.option(
    "--ttl",
    type=click.IntRange(60, MAX_TTL_SECONDS),
    metavar="SECONDS",
    help="Lifetime of the new token (capped by KMS_TOKEN_MAX_LIFETIME for the role; "
    "default: that cap, or no expiry).",
)


@principals.command("disable")
@_name
@remote
def principals_disable(name: str, url: str, token_file: Path | None) -> None:
    """Disable a principal. Every token, SigV4 credential, certificate and dashboard
    session of it is refused from now on, on every node, and its dashboard sessions are
    ended (never yourself, nor the last enabled admin)."""
    with clear_errors():
        print_json(client(url, token_file).disable_principal(name))


@principals.command("enable")
@_name
@remote
def principals_enable(name: str, url: str, token_file: Path | None) -> None:
    """Enable a disabled principal. Its unexpired tokens work again; its dashboard
    sessions stay ended."""
    with clear_errors():
        print_json(client(url, token_file).enable_principal(name))


@principals.command("end-sessions")
@_name
@remote
def principals_end_sessions(name: str, url: str, token_file: Path | None) -> None:
    """End a principal's dashboard sessions. Those opened until now are refused."""
    with clear_errors():
        print_json(client(url, token_file).end_sessions(name))


@principals.command("tokens")
@_name
@remote
def principals_tokens(name: str, url: str, token_file: Path | None) -> None:
    """List a principal's tokens. Each by its id, with its creation, expiry and last
    use; never the token itself."""
    with clear_errors():
        print_json(client(url, token_file).list_tokens(name))


@principals.command("issue-token")
@_name
@_ttl
@remote
def principals_issue_token(name: str, ttl: int | None, url: str, token_file: Path | None) -> None:
    """Issue another token. The answer holds the token, shown only this once."""
    with clear_errors():
        print_json(client(url, token_file).issue_token(name, ttl))


@principals.command("rotate-token")
@_name
@_token_id
@click.option(
    "--grace",
    type=click.IntRange(0, MAX_GRACE_SECONDS),
    default=0,
    show_default=True,
    metavar="SECONDS",
    help="How long the old token keeps working (0: it is refused at once).",
)
@_ttl
@remote
def principals_rotate_token(
    name: str, token_id: str, grace: int, ttl: int | None, url: str, token_file: Path | None
) -> None:
    """Replace a token. The answer holds the new token, shown only this once; TOKEN_ID
    expires after --grace seconds."""
    with clear_errors():
        print_json(client(url, token_file).rotate_token(name, token_id, grace, ttl))


@principals.command("revoke-token")
@_name
@_token_id
@remote
def principals_revoke_token(name: str, token_id: str, url: str, token_file: Path | None) -> None:
    """Revoke a token. It is refused at once, on every node."""
    with clear_errors():
        print_json(client(url, token_file).revoke_token(name, token_id))


@click.group()
def keys() -> None:
    """Create, inspect and change keys."""


@keys.command("create")
@click.option("--alias")
@click.option("--description", default="")
@remote
def keys_create(alias: str | None, description: str, url: str, token_file: Path | None) -> None:
    with clear_errors():
        print_json(client(url, token_file).create_key(alias, description))


@keys.command("list")
@remote
def keys_list(url: str, token_file: Path | None) -> None:
    with clear_errors():
        print_json(client(url, token_file).list_keys())


@keys.command("show")
@click.argument("ref")
@remote
def keys_show(ref: str, url: str, token_file: Path | None) -> None:
    with clear_errors():
        print_json(client(url, token_file).get_key(ref))


def _key_action(action: str, doc: str) -> None:
    @keys.command(action, help=doc)
    @click.argument("ref")
    @remote
    def command(ref: str, url: str, token_file: Path | None) -> None:
        with clear_errors():
            print_json(client(url, token_file).key_action(ref, action))


for _action, _doc in (
    ("rotate", "Add a new key version and make it current."),
    ("disable", "Refuse every use of the key until enabled."),
    ("enable", "Allow use of a disabled key again."),
    ("cancel-deletion", "Cancel a scheduled deletion (the key becomes disabled)."),
):
    _key_action(_action, _doc)


@keys.command("schedule-deletion")
@click.argument("ref")
@click.option("--pending-days", default=30, show_default=True, type=click.IntRange(7, 30))
@remote
def keys_schedule_deletion(ref: str, pending_days: int, url: str, token_file: Path | None) -> None:
    """Schedule deletion after a waiting period of 7 to 30 days."""
    with clear_errors():
        print_json(
            client(url, token_file).key_action(
                ref, "schedule-deletion", {"pending_days": pending_days}
            )
        )


@keys.command("config")
@click.argument("ref")
@click.option("--rotation-period-days", type=int, help="Rotate every N days (1..3650).")
@click.option("--no-rotation", is_flag=True, help="Turn scheduled rotation off.")
@click.option("--min-decryption-version", type=int, help="Refuse blobs under older versions.")
@remote
def keys_config(
    ref: str,
    rotation_period_days: int | None,
    no_rotation: bool,
    min_decryption_version: int | None,
    url: str,
    token_file: Path | None,
) -> None:
    """Set a key's rotation period and/or minimum decryption version."""
    settings: dict[str, int | None] = {}
    if no_rotation and rotation_period_days is not None:
        raise click.UsageError("give --rotation-period-days or --no-rotation, not both")
    if no_rotation or rotation_period_days is not None:
        settings["rotation_period_days"] = rotation_period_days
    if min_decryption_version is not None:
        settings["min_decryption_version"] = min_decryption_version
    if not settings:
        raise click.UsageError("nothing to change")
    with clear_errors():
        print_json(client(url, token_file).configure_key(ref, **settings))


@keys.command("retire")
@click.argument("ref")
@click.option("--up-to", required=True, type=click.IntRange(1), help="Last version to retire.")
@remote
def keys_retire(ref: str, up_to: int, url: str, token_file: Path | None) -> None:
    """Retire versions 1..N: their blobs are refused from now on (rewrap them first)."""
    with clear_errors():
        print_json(client(url, token_file).configure_key(ref, min_decryption_version=up_to + 1))


@keys.command("usage")
@click.argument("ref")
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 366))
@remote
def keys_usage(ref: str, days: int, url: str, token_file: Path | None) -> None:
    """Decrypts per version (count, last use) and per day, from the audit trail."""
    with clear_errors():
        print_json(client(url, token_file).key_usage(ref, days))


@click.group()
def grants() -> None:
    """Allow service principals to use keys."""


@grants.command("set")
@click.argument("ref")
@click.option("--principal", required=True)
@click.option(
    "--operations",
    required=True,
    help="Comma-separated: datakey,encrypt,decrypt,rewrap (empty string revokes).",
)
@remote
def grants_set(
    ref: str, principal: str, operations: str, url: str, token_file: Path | None
) -> None:
    ops = [o.strip() for o in operations.split(",") if o.strip()]
    with clear_errors():
        print_json(client(url, token_file).grant(ref, principal, ops))
