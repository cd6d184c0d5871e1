"""``kms escrow``: custodian keys, cases, offline approvals, unwrapping under a case."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms.cli.common import clear_errors, client, print_json, printable, private_key, remote
from kms.formats import escrow as escrowfmt


@click.group()
def escrow() -> None:
    """Escrow cases: public-authority access with M-of-N custodian approvals."""


@escrow.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def keygen(out: Path) -> None:
    """Make a custodian key pair on this machine: the private key goes to OUT (0600, never
    sent anywhere); the public key is printed, for the admin to register."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise click.ClickException(str(e)) from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    click.echo(base64.b64encode(raw).decode())


@escrow.command("register-custodian")
@click.argument("name")
@click.option("--group", required=True, help="e.g. keyholder, data_owner, legal")
@click.option("--public-key", required=True, help="Base64 raw Ed25519 key (from keygen).")
@click.option(
    "--endorsement",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="JSON from `kms escrow endorse` by a member (needed once the group has one).",
)
@remote
def register_custodian(
    name: str,
    group: str,
    public_key: str,
    endorsement: Path | None,
    url: str,
    token_file: Path | None,
) -> None:
    """Register a custodian's public key (admin; NAME is a principal with role custodian)."""
    raw = _b64_option(public_key, "--public-key")
    with clear_errors():
        endorsed = json.loads(endorsement.read_text()) if endorsement else None
        print_json(client(url, token_file).register_custodian(name, group, raw, endorsed))


@escrow.command("endorse")
@click.argument("name")
@click.option("--group", required=True)
@click.option("--public-key", required=True, help="The new custodian's key (base64).")
@click.option(
    "--key", "key_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@click.option("--custodian", required=True, help="Your custodian name (a member of GROUP).")
def endorse(name: str, group: str, public_key: str, key_file: Path, custodian: str) -> None:
    """Endorse a new custodian of your group offline; prints the endorsement (JSON) to hand
    to the admin who registers them."""
    raw = _b64_option(public_key, "--public-key")
    signature = private_key(key_file).sign(escrowfmt.enrolment_message(name, group, raw))
    print_json({"custodian": custodian, "signature": base64.b64encode(signature).decode()})


def _b64_option(value: str, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise click.BadParameter("not base64", param_hint=name) from None


@escrow.command("revoke-custodian")
@click.argument("name")
@remote
def revoke_custodian(name: str, url: str, token_file: Path | None) -> None:
    with clear_errors():
        print_json(client(url, token_file).revoke_custodian(name))


def _pairs(values: tuple[str, ...]) -> dict[str, str] | None:
    if not values:
        return None
    out = {}
    for value in values:
        k, sep, v = value.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--context")
        out[k] = v
    return out


@escrow.command("file")
@click.option("--legal-basis", required=True)
@click.option("--reference", required=True)
@click.option(
    "--justification",
    required=True,
    type=click.Choice(["legal_request", "break_glass", "backup_restore", "customer_initiated"]),
)
@click.option("--key", "keys", required=True, multiple=True, help="Key id or alias (repeat).")
@click.option("--context", multiple=True, help="KEY=VALUE every unwrap's context must hold.")
@click.option(
    "--blob",
    "blobs",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="File holding one wrapped blob the case may open (repeat).",
)
@click.option("--max-unwraps", required=True, type=click.IntRange(1))
@click.option("--expires-in", required=True, type=click.IntRange(60), help="Seconds.")
@remote
def file_case(
    legal_basis: str,
    reference: str,
    justification: str,
    keys: tuple[str, ...],
    context: tuple[str, ...],
    blobs: tuple[Path, ...],
    max_unwraps: int,
    expires_in: int,
    url: str,
    token_file: Path | None,
) -> None:
    """File a case (requester)."""
    scope: dict[str, Any] = {"keys": list(keys)}
    if context:
        scope["context"] = _pairs(context)
    if blobs:
        scope["blobs"] = [base64.b64encode(p.read_bytes()).decode() for p in blobs]
    with clear_errors():
        print_json(
            client(url, token_file).file_case(
                {
                    "legal_basis": legal_basis,
                    "reference": reference,
                    "justification": justification,
                    "scope": scope,
                    "max_unwraps": max_unwraps,
                    "expires_in_seconds": expires_in,
                }
            )
        )


@escrow.command("show")
@click.argument("case_id")
@remote
def show(case_id: str, url: str, token_file: Path | None) -> None:
    with clear_errors():
        print_json(client(url, token_file).get_case(case_id))


def _decide(
    case_id: str,
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
        case = api.get_case(case_id)
        # Sign what the case says, recomputed here, never the server's digest as given.
        digest = escrowfmt.case_digest(case)
        if base64.b64encode(digest).decode() != case["digest"]:
            raise click.ClickException("the server's digest does not match the case: not signing")
        scope = case["scope"]
        case = {k: printable(v) if isinstance(v, str) else v for k, v in case.items()}
        click.echo(
            f"Case {case['case_id']} version {case['version']}, filed by {case['requester']}\n"
            f"  legal basis:   {case['legal_basis']}\n"
            f"  reference:     {case['reference']}\n"
            f"  justification: {case['justification']}\n"
            f"  keys:          {', '.join(scope['keys'])}\n"
            f"  context:       {scope.get('context') or 'any (every record of these keys)'}\n"
            f"  blobs:         {len(scope['blobs']) if scope.get('blobs') else 'any'}\n"
            f"  unwraps:       at most {case['max_unwraps']}, until {case['expires_at']}",
            err=True,
        )
        if not yes and not click.confirm(f"Sign this {decision}?", err=True):
            raise click.ClickException("not signed")
        signature = key.sign(escrowfmt.signed_message(digest, decision))
        print_json(api.decide_case(case_id, custodian, signature, decision))


@escrow.command("approve")
@click.argument("case_id")
@click.option(
    "--key", "key_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@click.option("--custodian", required=True, help="Your custodian name.")
@click.option("--yes", is_flag=True, help="Sign without asking (after reviewing the case).")
@remote
def approve(
    case_id: str, key_file: Path, custodian: str, yes: bool, url: str, token_file: Path | None
) -> None:
    """Sign the case (recomputed locally) with your key and submit the approval."""
    _decide(case_id, key_file, custodian, "approve", yes, url, token_file)


@escrow.command("reject")
@click.argument("case_id")
@click.option(
    "--key", "key_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@click.option("--custodian", required=True)
@click.option("--yes", is_flag=True, help="Sign without asking (after reviewing the case).")
@remote
def reject(
    case_id: str, key_file: Path, custodian: str, yes: bool, url: str, token_file: Path | None
) -> None:
    """Sign a rejection (a veto if your group is a veto group)."""
    _decide(case_id, key_file, custodian, "reject", yes, url, token_file)


@escrow.command("revoke")
@click.argument("case_id")
@remote
def revoke(case_id: str, url: str, token_file: Path | None) -> None:
    with clear_errors():
        print_json(client(url, token_file).end_case(case_id, "revoke"))


@escrow.command("close")
@click.argument("case_id")
@remote
def close(case_id: str, url: str, token_file: Path | None) -> None:
    with clear_errors():
        print_json(client(url, token_file).end_case(case_id, "close"))


@escrow.command("unwrap")
@click.argument("case_id")
@click.option("--blob", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--context", multiple=True, help="KEY=VALUE (the blob's encryption context).")
@click.option("--justification", required=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the plaintext here (0600); default: base64 on stdout.",
)
@remote
def unwrap(
    case_id: str,
    blob: Path,
    context: tuple[str, ...],
    justification: str,
    out: Path | None,
    url: str,
    token_file: Path | None,
) -> None:
    """Unwrap one blob under an active case (requester)."""
    with clear_errors():
        # Open the output first: an unwrap spends the case's budget and must not be lost.
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) if out else None
        try:
            plaintext = client(url, token_file).decrypt(
                blob.read_bytes(), _pairs(context), justification, case_id=case_id
            )
        except BaseException:
            if fd is not None and out is not None:
                os.close(fd)
                out.unlink()
            raise
    if fd is None:
        click.echo(base64.b64encode(plaintext).decode())
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(plaintext)
