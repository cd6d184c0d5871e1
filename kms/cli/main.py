"""The ``kms`` command group: it gathers the commands defined in the other modules of
this package (see the package docstring)."""

from __future__ import annotations

import click

from kms.cli.admin import grants, keys, principals
from kms.cli.audit import audit
from kms.cli.backup import backup, restore
from kms.cli.changes import changes
from kms.cli.escrow import escrow
from kms.cli.local import init, migrate, rotate_due, serve
from kms.cli.rewrap import rewrap


@click.group()
@click.version_option(package_name="keyholder-kms")
def main() -> None:
    """Keyholder KMS: HSM-backed envelope encryption with an audit trail."""


for _command in (
    init,
    migrate,
    serve,
    rotate_due,
    principals,
    keys,
    grants,
    audit,
    escrow,
    changes,
    rewrap,
    backup,
    restore,
):
    main.add_command(_command)
